"""Configuration: presets are data files, every value's layer is known (jem config, config_sources.json), legacy
configs are read, and the codebase keeps its shape (tools/shape.py)."""
import json
import runpy
import sys
from dataclasses import fields
from importlib import resources
from pathlib import Path

import pytest

from jemtorch.cli import main
from jemtorch.config import RECIPES, SECTIONS, TrainConfig, dataset_preset, make_config, resolve_with_sources
from jemtorch.data import DATASETS

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_is_a_readable_file_of_known_entries():
    presets = sorted(p.name for p in (resources.files("jemtorch") / "presets").iterdir() if p.name.endswith(".toml"))
    assert presets == sorted(f"{d}.toml" for d in DATASETS if d != "imagefolder")
    known = {f.name for f in fields(TrainConfig)}
    for name in DATASETS:
        preset = dataset_preset(name)
        assert preset.get("recipe", "jem") in RECIPES, name
        for table, entries in preset.items():
            if table != "recipe":
                assert set(entries) <= known, (name, table, set(entries) - known)
                make_config(dataset=name, recipe=table if table in RECIPES else None)  # every table resolves
    text = (resources.files("jemtorch") / "presets" / "fashion-mnist.toml").read_text()
    values = [ln for ln in text.splitlines() if "=" in ln and not ln.startswith("#")]
    assert len(values) > 15 and all("#" in ln for ln in values)  # a one-line reason beside every value


def test_shipped_config_files_resolve_and_give_a_reason_per_value():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        dataset = path.stem.split("-density")[0]
        cfg = make_config(str(path), dataset=dataset)
        assert cfg.norm is None and cfg.sgld_step_cap > 0 and cfg.px_tail_scale > 0, path.name
        values = [ln for ln in path.read_text().splitlines() if "=" in ln and not ln.startswith("#")]
        assert values and all("#" in ln for ln in values), path.name


def test_each_value_says_which_layer_set_it(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("sgld_steps = 4\n")
    cfg, src = resolve_with_sources({"dataset": "fashion-mnist", "lr": 0.05}, str(cfg_file))
    assert (src["dataset"], src["lr"], src["sgld_steps"], src["recipe"]) == ("flag", "flag", f"config file {cfg_file}",
                                                                             "preset fashion-mnist.toml")
    assert src["model"] == "preset fashion-mnist.toml [sadajem]" and src["norm"] == "recipe sadajem"
    assert src["seed"] == "default" and cfg.sgld_steps == 4 and cfg.lr == 0.05
    assert set(src) == {f.name for f in fields(TrainConfig)}
    assert [f.name for s in SECTIONS for f in fields(s)] == [f.name for f in fields(TrainConfig)]  # one owner each


def test_a_config_file_extends_another_and_each_value_names_its_file(tmp_path):
    (tmp_path / "base.toml").write_text('sgld_steps = 4\nlr = 0.02\n')
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.toml"
    child.write_text('extends = "../base.toml"\nlr = 0.03\n')  # relative to the file, not to the working directory
    cfg, src = resolve_with_sources({"dataset": "fashion-mnist", "epochs": 2}, str(child))
    assert (cfg.sgld_steps, cfg.lr, cfg.epochs) == (4, 0.03, 2)
    assert (src["sgld_steps"], src["lr"], src["epochs"]) == (f"config file {child.parent / '../base.toml'}",
                                                             f"config file {child}", "flag")
    for text, message in [('extends = "child.toml"', "makes a cycle"), ('extends = 3', "must name a config file"),
                          ('extends = "missing.toml"', "config file not found")]:
        (tmp_path / "sub" / "child.toml").write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            make_config(str(child))


def test_jem_config_prints_and_jem_train_records_the_sources(tmp_path, capsys):
    assert main(["config", "--dataset", "fashion-mnist", "--epochs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln for ln in lines if ln.startswith("epochs "))
    assert row.split()[1:] == ["3", "flag"] and any("preset fashion-mnist.toml [sadajem]" in ln for ln in lines)
    assert main(["config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lr"] == {"value": 1e-3, "source": "preset digits.toml [jem]"}
    run = tmp_path / "r"
    assert main(["train", "--model", "cnn-4", "--sgld-steps", "1", "--buffer-size", "50", "--max-iters", "2",
                 "--no-progress", "--out", str(run)]) == 0
    sources = json.loads((run / "config_sources.json").read_text())
    assert sources["model"] == "flag" and sources["epochs"] == "preset digits.toml [all]"
    assert main(["train", "--resume", str(run), "--max-iters", "4", "--lr", "0.002", "--no-progress"]) == 0
    sources = json.loads((run / "config_sources.json").read_text())
    assert sources["model"] == "flag" and sources["lr"] == "flag"  # a resume keeps where the old values came from
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "elsewhere"), "--no-progress"]) == 2
    assert "cannot send it elsewhere" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()


def test_a_config_written_by_jemtorch_01_is_read():
    old = {"dataset": "fashion-mnist", "px_ramp_iters": 421, "batch_size": 128}
    assert TrainConfig.from_dict(dict(old)).px_ramp_epochs == pytest.approx(421 / 421)  # 54 000 images / 128
    with pytest.raises(ValueError, match="replaced by px_ramp_epochs"):
        TrainConfig.from_dict({"dataset": "imagefolder", "px_ramp_iters": 100})


def test_the_codebase_keeps_its_shape(capsys):
    """tools/shape.py: the loop's largest class ≤ 150 lines, longest function ≤ 40, no library module imports a
    command driver."""
    argv = sys.argv
    sys.argv = [str(ROOT / "tools/shape.py")]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    assert e.value.code == 0, capsys.readouterr().out
