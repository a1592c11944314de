"""Safe with files from strangers: no code runs unless trusted, no write escapes the directory a command names,
hostile images never sink a batch, damaged caches heal, and every refusal is one line."""
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import grey_imagefolder
from jemtorch.checkpoint import load_safe
from jemtorch.cli import main

TINY = ["--model", "cnn-4", "--sgld-steps", "1", "--buffer-size", "100", "--epochs", "1", "--no-progress"]


def one_line(capsys, *fragments) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A PNG whose header says side × side pixels (a decompression bomb as a reader first sees it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) +
                     chunk(b"IEND", b""))
    return path


@pytest.fixture
def export_dir(trained_runs, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(trained_runs / "base"), "--out", str(out)]) == 0
    return out


def edit_card(export_dir: Path, **changes) -> None:
    card = json.loads((export_dir / "model.json").read_text())
    for k, v in changes.items():
        if "." in k:
            a, b = k.split(".")
            card[a][b] = v
        else:
            card[k] = v
    (export_dir / "model.json").write_text(json.dumps(card))


# 1. code runs on load ----------------------------------------------------------------------------------------------
EVIL = "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('code ran')\n" \
       "def make(in_channels, num_classes):\n    raise SystemExit\n"


def test_no_code_runs_from_a_card_or_a_config_unless_trusted(export_dir, tmp_path, capsys):
    (tmp_path / "evil.py").write_text(EVIL)
    edit_card(export_dir, **{"architecture.model": f"{tmp_path / 'evil.py'}:make", "weights_sha256": None})
    assert main(["score", str(export_dir), str(tmp_path), "--no-progress"]) == 2
    one_line(capsys, "is user code", "evil.py", "--trust-code")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": f"{tmp_path / 'evil.py'}:make"}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    one_line(capsys, "--trust-code")
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "r").exists()


# 2. writes never escape the directory ------------------------------------------------------------------------------
def test_no_write_goes_through_a_link(run_copy, tmp_path, capsys):
    run = run_copy("jem")
    target = tmp_path / "bashrc"
    target.write_text("mine")
    (run / "eval").mkdir()
    os.symlink(target, run / "eval" / "metrics.json")
    args = ["--n", "30", "--sample-steps", "1", "--n-samples", "10", "--n-gen", "20", "--no-progress", "--ood", "uniform"]
    assert main(["eval", str(run), *args]) == 2
    one_line(capsys, "symbolic link")
    (run / "eval" / "metrics.json").unlink()
    (run / "eval").rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, run / "eval")  # the whole folder pointing out
    assert main(["eval", str(run), *args]) == 2
    one_line(capsys, "symbolic link")
    (run / "curves.png").unlink()
    os.symlink(target, run / "curves.png")  # a file jem train writes
    assert main(["train", "--resume", str(run), "--epochs", "7", "--no-progress"]) == 2
    one_line(capsys, "curves.png", "symbolic link")
    (run / "robustness").mkdir()
    os.symlink(target, run / "robustness" / "report.md")
    assert main(["attack", str(run), "--n", "4", "--eps", "0", "--no-progress"]) == 2
    one_line(capsys, "symbolic link")
    assert target.read_text() == "mine" and list(elsewhere.iterdir()) == []


# 3. cards pointing outside, 4. non-finite weights --------------------------------------------------------------------
@pytest.mark.parametrize("change,msg", [
    ({"weights": "../other/model.safetensors"}, "must be a file inside the export folder"),
    ({"weights": "/etc/passwd"}, "must be a file inside the export folder"),
    ({"weights_sha256": "0" * 64}, "does not match the SHA-256"),
])
def test_a_card_cannot_point_outside_or_at_other_weights(export_dir, tmp_path, capsys, change, msg):
    edit_card(export_dir, **change)
    assert main(["score", str(export_dir), str(tmp_path), "--no-progress"]) == 2
    one_line(capsys, msg)


def test_non_finite_export_weights_are_refused(export_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(str(export_dir / "model.safetensors"))
    next(iter(state.values())).fill_(float("nan"))
    save_file(state, str(export_dir / "model.safetensors"))
    edit_card(export_dir, weights_sha256=None)  # a card without a checksum still gets its weights checked
    assert main(["score", str(export_dir), str(tmp_path), "--no-progress"]) == 2
    one_line(capsys, "not finite")


# 5. hostile images -----------------------------------------------------------------------------------------------------
def test_hostile_images_are_skipped_and_the_good_ones_scored(trained_runs, tmp_path, capsys):
    from jemtorch.data import load_dataset

    good = load_dataset("digits").x_test[:3, 0].numpy()
    folder = tmp_path / "imgs"
    folder.mkdir()
    png_bomb(folder / "bomb.png")
    from PIL import Image

    Image.fromarray(good[0]).save(folder / "good.png")
    np.save(tmp_path / "empty.npy", np.zeros((3, 0, 8), np.uint8))  # a zero-sized dimension
    with open(tmp_path / "huge.npy", "wb") as f:  # a header that claims 1 TB
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 10**3, 10**3)})
    np.savez(tmp_path / "mixed.npz", ok=good, bad=np.zeros((5, 7), np.uint8))
    code = main(["score", str(trained_runs / "base"), str(folder), str(tmp_path / "empty.npy"),
                 str(tmp_path / "huge.npy"), str(tmp_path / "mixed.npz"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert len(out.strip().splitlines()) == 1 + 1 + 3  # the header, good.png, the npz's three good images
    assert "bomb.png" in err and "pixels" in err and "empty.npy" in err and "huge.npy" in err
    assert "mixed.npz:bad" in err and "(5, 7)" in err and "4 skipped" in err
    # jem eval on a folder with a bomb: the set is the readable images, the skip said
    assert main(["eval", str(trained_runs / "base"), "--ood", str(folder), "--n", "20", "--sample-steps", "1",
                 "--n-samples", "10", "--n-gen", "20", "--no-progress"]) == 0
    assert "skipped 1 unreadable image" in capsys.readouterr().err


# 6. one line, not a traceback -------------------------------------------------------------------------------------
@pytest.mark.parametrize("card,msg", [
    ([1, 2], "a JSON list"),
    ({"architecture.model": 7}, "architecture.model must be a model name"),
    ({"architecture.model": "cnn-1000000"}, "width must be in 1..1024"),
    ({"architecture.dropout": "abc"}, "architecture.dropout must be a number in [0, 1), got 'abc'"),
])
def test_a_broken_card_is_one_line(export_dir, tmp_path, capsys, card, msg):
    if isinstance(card, list):
        (export_dir / "model.json").write_text(json.dumps(card))
    else:
        edit_card(export_dir, **card)
    assert main(["score", str(export_dir), str(tmp_path), "--no-progress"]) == 2
    one_line(capsys, msg)


@pytest.mark.parametrize("entries,msg", [
    ({"model": 7}, "--model must be a string"), ({"model": None}, "--model must be a string"),
    ({"model": ["cnn"]}, "--model must be a string"), ({"recipe": ["jem"]}, "--recipe must be one of"),
    ({"buffer_size": 1e12}, "--buffer-size must be in 1..10000000"), ({"seed": 1e30}, "--seed must be in 0..2**63-1"),
])
def test_a_broken_config_is_one_line(tmp_path, capsys, entries, msg):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(entries))
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    one_line(capsys, msg)
    assert not (tmp_path / "r").exists()


def test_a_pathological_calibration_file_is_fitted_again(run_copy, tmp_path, capsys):
    run = run_copy("base")
    (run / "ood_calibration.json").write_text("[" * 100_000 + "]" * 100_000)
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.uint8))
    assert main(["score", str(run), str(tmp_path / "x.npy"), "--no-progress"]) == 0
    assert "malformed; fitting the OOD thresholds again" in capsys.readouterr().err


# 7. nothing written before a refusal ----------------------------------------------------------------------------------
def test_refusals_come_before_any_write(trained_runs, tmp_path, capsys, monkeypatch):
    import importlib.util

    from jemtorch import rundir

    monkeypatch.setattr(rundir.TensorBoardLog, "check_available",
                        staticmethod(lambda: (_ for _ in ()).throw(ValueError("--tensorboard needs the tensorboard "
                                                                               "package: pip install tensorboard"))))
    assert main(["train", *TINY, "--tensorboard", "--out", str(tmp_path / "tb")]) == 2
    one_line(capsys, "--tensorboard needs")
    assert not (tmp_path / "tb").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", str(trained_runs / "base"), "--out", str(tmp_path / "x"), "--onnx"]) == 2
    one_line(capsys, "--onnx needs the onnx package")
    assert not (tmp_path / "x").exists()


# 8. damaged caches heal ------------------------------------------------------------------------------------------------
def test_damaged_caches_are_rebuilt_and_said(tmp_path, capsys, monkeypatch):
    from jemtorch.data import load_dataset
    from jemtorch.sampler import fit_gaussians_cached

    # a cache of its own: in the worker's shared one, the glob below could find another test's file and damage that
    monkeypatch.setenv("JEMTORCH_CACHE", str(tmp_path / "cache"))
    root = grey_imagefolder(tmp_path / "img")
    first = load_dataset("imagefolder", root)
    cache = next(Path(os.environ["JEMTORCH_CACHE"]).glob("imagefolder-*.npz"))
    cache.write_bytes(os.urandom(500))
    again = load_dataset("imagefolder", root)
    assert torch.equal(first.x_train, again.x_train) and "damaged" in capsys.readouterr().err
    x = torch.randint(0, 255, (40, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(40) % 2
    g = fit_gaussians_cached(x, y, 2)
    gpath = next(Path(os.environ["JEMTORCH_CACHE"]).glob("gaussians-*.pt"))
    state = load_safe(gpath)
    state["mean"].fill_(float("nan"))
    torch.save(state, gpath)
    healed = fit_gaussians_cached(x, y, 2)
    assert torch.equal(healed.mean, g.mean) and "damaged" in capsys.readouterr().err


# 9. ~ in the README's own example, 10./11. clear messages, a lost peer ---------------------------------------------
def test_home_in_a_comma_list_and_clear_messages(trained_runs, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from jemtorch.metrics import frechet_distance

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my-photos").mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "my-photos" / f"{i}.png")
    assert main(["eval", str(trained_runs / "base"), "--ood", "uniform,~/my-photos", "--n", "20", "--sample-steps",
                 "1", "--n-samples", "10", "--n-gen", "20", "--no-progress"]) == 0
    assert "my-photos" in json.loads((trained_runs / "base/eval/metrics.json").read_text())["ood"]
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        frechet_distance(np.ones((1, 3)), np.ones((5, 3)))


def test_a_lost_peer_is_one_line(tmp_path, capsys, monkeypatch):
    from jemtorch import cli
    from jemtorch.distributed import Dist

    monkeypatch.setattr(Dist, "from_env", classmethod(lambda cls, device="auto": cls(1, 2, 1)))
    monkeypatch.setattr(Dist, "close", lambda self, ok=True: None)

    def broken(*a, **k):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1234")

    monkeypatch.setattr(cli, "_train", broken)
    assert cli._main(["train", *TINY, "--out", str(tmp_path / "r")]) == 1
    one_line(capsys, "rank 1 lost the other processes", "--resume")
