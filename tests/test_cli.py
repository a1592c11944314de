import json
import os
import subprocess
import sys

import pytest

from jemtorch.cli import main

TINY = ["--model", "cnn-4", "--sgld-steps", "1", "--buffer-size", "100", "--epochs", "1", "--no-progress",
        "--batch-size", "64"]


def test_cli_train_end_to_end_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "digits" and summary["iterations"] == 20
    assert (run / "samples_cond.png").is_file()
    # an existing run is never overwritten by accident
    assert main(["train", *TINY, "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["iterations"] == 40


def test_cli_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('sgld-steps = 1\nbuffer_size = 50\nmodel = "cnn-4"\nepochs = 1\nlr = 0.01\n')
    assert main(["train", "--config", str(cfg), "--lr", "0.002", "--out", str(tmp_path / "r"), "--no-progress",
                 "--max-iters", "3"]) == 0
    resolved = json.loads((tmp_path / "r/config.json").read_text())
    assert resolved["lr"] == 0.002 and resolved["buffer_size"] == 50 and resolved["sgld_steps"] == 1


@pytest.mark.parametrize("argv,msg", [
    (["--sgld-steps", "-3"], "--sgld-steps must be >= 0"),
    (["--reinit-freq", "1.5"], "--reinit-freq"),
    (["--sgld-step-cap", "-0.1"], "--sgld-step-cap must be >= 0"),
    (["--sgld-step-cap", "0.02", "--sgld-update", "pyld"], "--sgld-step-cap applies to --sgld-update sgld and clamped"),
    (["--dataset", "mnist", "--data-root", "/nonexistent"], "MNIST not found"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--model", "vgg"], "unknown model"),
    (["--config", "/nonexistent.json"], "config file not found"),
])
def test_cli_bad_inputs(tmp_path, capsys, argv, msg):
    out = tmp_path / "r"
    assert main(["train", *argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (out / "checkpoint.pt").exists()


def test_cli_resume_missing_and_corrupt(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--max-iters", "2"]) == 0
    (run / "checkpoint.pt").write_bytes(b"garbage")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err


def test_cli_bad_flag_type_exits_nonzero():
    r = subprocess.run([sys.executable, "-m", "jemtorch.cli", "train", "--lr", "fast"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 2 and "invalid float value" in r.stderr


@pytest.mark.parametrize("command", ["train", "eval", "attack", "distal", "score", "export"])
def test_help_works_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"usage: jem {command}" in out
