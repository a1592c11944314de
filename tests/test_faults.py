"""Nothing lost, nothing silent: run-directory rules, interrupt/resume, caches, one-line errors, non-finite values."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import grey_imagefolder
from jemtorch.checkpoint import CheckpointError, load_safe, save_atomic
from jemtorch.cli import main
from jemtorch.data import load_dataset
from jemtorch.metrics import expected_calibration_error, frechet_distance, ood_metrics

TINY = ["--model", "cnn-4", "--sgld-steps", "1", "--buffer-size", "100", "--epochs", "1", "--no-progress",
        "--batch-size", "64"]
REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------
# run directories
# ---------------------------------------------------------------------------------------------------------------
def test_out_that_is_not_a_run_directory_is_left_alone(tmp_path, capsys):
    d = tmp_path / "d"
    (d / "samples").mkdir(parents=True)
    (d / "config.json").write_text("mine")
    (d / "samples" / "holiday.png").write_text("mine too")
    for extra in ([], ["--overwrite"]):
        assert main(["train", *TINY, "--out", str(d), *extra]) == 2
        one_line_error(capsys, "not a jemtorch run directory")
        assert (d / "config.json").read_text() == "mine" and (d / "samples" / "holiday.png").read_text() == "mine too"
        assert not (d / "summary.json").exists()
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["train", *TINY, "--out", str(f)]) == 2
    one_line_error(capsys, "is a file")
    assert main(["train", *TINY, "--out", str(f / "sub")]) == 2  # a file where a folder should be
    one_line_error(capsys)


def test_overwrite_removes_only_what_jem_train_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--sample-every", "10"]) == 0
    assert (run / ".jemtorch-run").is_file()
    own = sorted(p.name for p in (run / "samples").iterdir())
    assert own and all(n.startswith(("uncond_", "cond_")) for n in own)
    (run / "samples" / "my-notes.png").write_text("mine")
    (run / "notes.txt").write_text("mine")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")
    assert main(["train", *TINY, "--out", str(run), "--overwrite", "--max-iters", "3"]) == 0
    assert (run / "samples" / "my-notes.png").read_text() == "mine" and (run / "notes.txt").read_text() == "mine"
    assert (run / "eval" / "metrics.json").exists()
    assert not any((run / "samples" / n).exists() for n in own if "0000010" in n)  # the old run's grids are gone
    assert json.loads((run / "summary.json").read_text())["iterations"] == 3


def test_imagefolder_cache_follows_the_files(tmp_path):
    root = grey_imagefolder(tmp_path / "img")
    first = load_dataset("imagefolder", root)
    assert len(first.x_train) == 6
    (root / "train" / "a" / "0.png").unlink()  # delete one
    Image.fromarray(np.full((4, 4), 200, np.uint8)).save(root / "train" / "b" / "1.png")  # rewrite one in place
    second = load_dataset("imagefolder", root)
    assert len(second.x_train) == 5 and (second.x_train == 200).any()


# ---------------------------------------------------------------------------------------------------------------
# interrupt and resume
# ---------------------------------------------------------------------------------------------------------------
def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    args = ["train", "--model", "cnn-4", "--sgld-steps", "2", "--buffer-size", "200", "--epochs", "3",
            "--batch-size", "32", "--log-every", "1", "--no-progress"]
    # one thread everywhere (the interrupted run in a process of its own, the others here): one float reduction order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "full")]) == 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        run = tmp_path / "cut"
        proc = subprocess.Popen([sys.executable, "-m", "jemtorch", *args, "--out", str(run)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = run / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not log.exists() or log.read_text().count('"train"') < 25):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err  # stopped by the interrupt, not finished
        assert "checkpoint saved" in err and "Traceback" not in err
        cut_at = load_safe(run / "checkpoint.pt")["step"]
        assert 25 <= cut_at < 3 * 40
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = load_safe(tmp_path / "full/checkpoint.pt"), load_safe(run / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "time"} for ln in p.read_text().splitlines()]
    assert strip(tmp_path / "full/metrics.jsonl") == strip(log)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", run))
    assert sa["test_accuracy"] == sb["test_accuracy"] and sa["test_nll"] == sb["test_nll"]


def test_resume_applies_what_may_change_and_refuses_the_rest(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--lr", "0.01", "--warmup-iters", "0"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--lr", "0.0005", "--no-progress"]) == 0
    assert "lr 0.01 -> 0.0005" in capsys.readouterr().err
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["changed"]["lr"] == [0.01, 0.0005] and resume[0]["step"] == 20
    lrs = [r["lr"] for r in records if r["kind"] == "train" and r["step"] > 20]
    assert lrs and all(lr == pytest.approx(0.0005) for lr in lrs)  # step schedule, no decay in 2 epochs
    assert json.loads((run / "config.json").read_text())["lr"] == 0.0005
    saved = json.loads((run / "config.json").read_text())
    del saved["sgld_step_cap"]  # a run written before the setting existed: its value was the default
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--resume", str(run), "--epochs", "2", "--sgld-step-cap", "0.5", "--no-progress"]) == 0
    assert "sgld_step_cap 0.0 -> 0.5" in capsys.readouterr().err
    before = (run / "config.json").read_text()
    for flag, value in (("--model", "cnn-8"), ("--dataset", "mnist"), ("--batch-size", "32")):
        assert main(["train", "--resume", str(run), flag, value, "--no-progress"]) == 2
        one_line_error(capsys, f"--resume cannot change {flag}")
        assert (run / "config.json").read_text() == before


def test_a_branch_from_a_kept_epoch_trains_as_the_run_did_and_leaves_it_untouched(tmp_path, capsys):
    args = ["train", *TINY, "--epochs", "3", "--log-every", "1", "--keep-epochs", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one float reduction order for the run and its branch
    try:
        run, branch, other = tmp_path / "run", tmp_path / "branch", tmp_path / "other"
        assert main([*args, "--out", str(run)]) == 0
        kept = sorted(p.name for p in run.glob("*-epoch*.pt"))
        assert kept == ["best-epoch2.pt", "checkpoint-epoch2.pt"] and load_safe(run / kept[1])["step"] == 2 * 20
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--from-epoch", "2", "--out", str(branch), "--no-progress"]) == 0
        assert "branching" in capsys.readouterr().err
        # a branch with nothing changed retrains the run's last epoch to the same weights, log and test accuracy
        a, b = load_safe(run / "checkpoint.pt"), load_safe(branch / "checkpoint.pt")
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "time"} for ln in p.read_text().splitlines()]
        assert strip(run / "metrics.jsonl") == strip(branch / "metrics.jsonl")
        assert (json.loads((run / "summary.json").read_text())["test_accuracy"]
                == json.loads((branch / "summary.json").read_text())["test_accuracy"])
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # only read
        assert (branch / "checkpoint-epoch2.pt").read_bytes() == before["checkpoint-epoch2.pt"]  # to branch again
        # a branch with a new value logs it from the branch point on
        assert main(["train", "--resume", str(run), "--from-epoch", "2", "--out", str(other), "--lr", "0.0005",
                     "--no-progress"]) == 0
        resume = [json.loads(ln) for ln in (other / "metrics.jsonl").read_text().splitlines() if '"resume"' in ln]
        assert len(resume) == 1 and resume[0]["step"] == 40 and resume[0]["changed"]["lr"][1] == 0.0005
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    for bad, fragment in ((["--from-epoch", "1", "--out", str(tmp_path / "x")], "kept: 2"),
                          (["--from-epoch", "2"], "name its folder with --out"),
                          (["--from-epoch", "2", "--out", str(branch)], "already holds a run")):
        assert main(["train", "--resume", str(run), *bad, "--no-progress"]) == 2
        one_line_error(capsys, fragment)
    assert not (tmp_path / "x").exists()
    assert main(["train", *TINY, "--from-epoch", "2", "--out", str(tmp_path / "y")]) == 2
    one_line_error(capsys, "give the run with --resume")
    assert main(["train", *TINY, "--keep-epochs", "2,x", "--out", str(tmp_path / "y")]) == 2
    one_line_error(capsys, "--keep-epochs must be epochs")
    assert main(["train", *TINY, "--overwrite", "--out", str(run)]) == 0  # --overwrite removes the kept copies too
    assert not list(run.glob("*-epoch*.pt"))
    from jemtorch.config import make_config
    assert make_config(keep_epochs=[4, 8]).kept_epochs == make_config(keep_epochs=" 8, 4").kept_epochs == {4, 8}


def test_torn_metrics_line_and_stale_temporaries(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a crash in the middle of a write
    (run / ".checkpoint.pt.12345.tmp").write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert not list(run.glob(".checkpoint.pt.*.tmp"))
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(ln)
    # a broken line in the middle is named, not a bare JSON traceback
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ["garbage"] + lines[2:]) + "\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-progress"]) == 2
    one_line_error(capsys, "metrics.jsonl, line 3")


def test_divergence_before_the_first_checkpoint_names_no_missing_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--inject-divergence", "3", "--max-rollbacks", "0"]) == 1
    err = capsys.readouterr().err
    assert "none written yet" in err and "checkpoint.pt" not in err


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"step": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="cannot write .*the previous file is intact"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert load_safe(path) == {"step": 1} and not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints that are valid torch files but not this run's
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_run(run_copy):
    return run_copy("jem")


@pytest.mark.parametrize("content,msg", [([1, 2, 3], "holds a list"), ({"model": {}}, "no buffer")])
def test_wrong_structure_checkpoint(small_run, capsys, content, msg):
    torch.save(content, small_run / "checkpoint.pt")
    assert main(["eval", str(small_run), "--n", "20", "--no-progress"]) == 2
    one_line_error(capsys, "not a jemtorch checkpoint", msg)
    assert main(["train", "--resume", str(small_run), "--no-progress"]) == 2
    one_line_error(capsys)


def test_checkpoint_of_another_run_is_refused(small_run, capsys):
    for name in ("checkpoint.pt", "best.pt"):
        state = load_safe(small_run / name)
        state["config"]["dataset"] = "mnist"  # as if copied in from an MNIST run of the same architecture
        torch.save(state, small_run / name)
    assert main(["eval", str(small_run), "--n", "20", "--no-progress"]) == 2
    one_line_error(capsys, "dataset=mnist", "belongs to another run")


def test_non_finite_weights_are_named_not_scored(small_run, capsys):
    state = load_safe(small_run / "best.pt")
    first = next(iter(state["model"]))
    state["model"][first].fill_(float("nan"))
    torch.save(state, small_run / "best.pt")
    for argv in (["eval", str(small_run), "--n", "20"], ["attack", str(small_run), "--n", "20"],
                 ["score", str(small_run), str(small_run)]):
        assert main([*argv, "--no-progress"]) == 2
        one_line_error(capsys, "weights are not finite")


def test_metric_functions_refuse_non_finite_inputs():
    with pytest.raises(ValueError, match="not finite"):
        ood_metrics(np.array([1.0, np.nan]), np.array([0.0, 0.1]))
    with pytest.raises(ValueError, match="not finite"):
        expected_calibration_error(torch.tensor([[np.nan, 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="not finite"):
        frechet_distance(np.array([[np.inf, 0.0], [1.0, 1.0]]), np.ones((2, 2)))


# ---------------------------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entries,msg", [
    ({"lr": "fast"}, "--lr must be a number"),
    ({"lr": float("nan")}, "--lr must be finite"),
    ({"epochs": 2.5}, "--epochs must be an integer"),
    ({"augment": "yes"}, "--augment must be true or false"),
    ({"decay_epochs": ["x"]}, "--decay-epochs must be a list of integers"),
])
def test_config_file_entries_are_type_checked(tmp_path, capsys, entries, msg):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(entries))
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    one_line_error(capsys, msg)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,msg", [
    (["train", "--lr", "inf"], "--lr must be finite"),
    (["train", "--lr", "nan"], "--lr must be finite"),
    (["train", "--epochs", "0"], "--epochs must be in 1.."),
    (["train", "--momentum", "-1"], "--momentum must be >= 0"),
    (["attack", "RUN", "--step-size", "nan"], "--step-size must be a finite number"),
    (["attack", "RUN", "--refine-chains", "0"], "--refine-chains"),
    (["distal", "RUN", "--class", "0", "--step-size", "inf"], "--step-size a finite number"),
    (["score", "RUN", "x.png", "--tpr", "nan"], "--tpr must be in (0, 1]"),
    (["eval", "RUN", "--bins", "0"], "--bins"),
])
def test_numeric_options_are_checked(small_run, tmp_path, capsys, argv, msg):
    argv = [str(small_run) if a == "RUN" else a for a in argv]
    extra = ["--out", str(tmp_path / "new"), "--no-progress"] if argv[0] == "train" else []
    assert main([*argv, *extra]) == 2
    one_line_error(capsys, msg)
