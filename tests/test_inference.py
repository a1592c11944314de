"""Using a trained JEM: jem score, jemtorch.load, jem export, OOD folders, TensorBoard, user model factories."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import jemtorch
from jemtorch.cli import main
from jemtorch.data import DatasetError, load_dataset, ood_labels, to_float, training_splits
from jemtorch.detectors import DETECTORS

TINY = ["--model", "cnn-4", "--sgld-steps", "1", "--buffer-size", "100", "--epochs", "1", "--no-progress"]
EVAL_TINY = ["--n", "60", "--sample-steps", "2", "--n-samples", "20", "--n-gen", "40", "--no-progress"]


def digits_pngs(folder, n, start=0, size=None, rgb=False):
    """``n`` digits test images as PNG files in ``folder`` (optionally resized / RGB)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = load_dataset("digits").x_test
    for i in range(start, start + n):
        im = Image.fromarray(x[i, 0].numpy())
        if size:
            im = im.resize((size, size))
        (im.convert("RGB") if rgb else im).save(folder / f"{i}.png")


def test_score_folder_with_corrupt_file_and_arrays(trained_runs, tmp_path, capsys):
    run = trained_runs / "jem"
    imgs = tmp_path / "imgs"
    digits_pngs(imgs / "a", 3)
    digits_pngs(imgs / "b" / "deeper", 2, start=3, size=16, rgb=True)  # other size and channels: converted
    (imgs / "broken.png").write_bytes(b"not an image")
    (imgs / "notes.txt").write_text("not an image file: ignored in folders")
    x = load_dataset("digits").x_test
    np.save(tmp_path / "arr.npy", x[:4, 0].numpy())  # (N, H, W) uint8
    np.savez(tmp_path / "arr.npz", a=(x[4:6].numpy().transpose(0, 2, 3, 1) / 255.0).astype(np.float32))  # NHWC float
    out = tmp_path / "scores.csv"
    code = main(["score", str(run), str(imgs), str(tmp_path / "arr.npy"), str(tmp_path / "arr.npz"),
                 str(tmp_path / "missing.png"), "--out", str(out), "--no-progress"])
    assert code == 0
    cap = capsys.readouterr()
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "pred", "class", "confidence", "logp", "gradnorm", "ood_score", "ood"]
    assert len(rows) == 5 + 4 + 2
    assert any(r["path"].endswith("arr.npy[3]") for r in rows) and any(r["path"].endswith("arr.npz:a[1]") for r in rows)
    assert {r["ood"] for r in rows} <= {"True", "False"}
    assert all(0 < float(r["confidence"]) <= 1 and float(r["gradnorm"]) <= 0 for r in rows)
    assert "broken.png" in cap.err and "missing.png" in cap.err and "2 skipped" in cap.err
    assert "2 images converted" in cap.err and "OOD flag:" in cap.err
    assert len(cap.out.strip().splitlines()) == 1 + len(rows)  # header + one line per image
    # the same images scored through the API agree with the CLI
    model = jemtorch.load(run)
    api = model.score(x[:4, 0].numpy()[:, None])
    npy_rows = [r for r in rows if "arr.npy" in r["path"]]
    assert [int(r["pred"]) for r in npy_rows] == api["pred"].tolist()
    assert np.allclose([float(r["logp"]) for r in npy_rows], api["logp"], atol=1e-4)
    # thresholds are stored with the run: a second scoring uses the same one without refitting
    cal = json.loads((run / "ood_calibration.json").read_text())
    assert cal["score"] in DETECTORS and len(cal["quantiles"]["logp"]) == 1001 and set(cal["quantiles"]) == set(DETECTORS)
    assert main(["score", str(run), str(imgs / "a"), "--no-progress"]) == 0
    assert "fitted" not in capsys.readouterr().err
    # an existing --out is never overwritten without --overwrite
    before = out.read_text()
    assert main(["score", str(run), str(imgs / "a"), "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == before
    assert main(["score", str(run), str(tmp_path / "nothing-here"), "--no-progress"]) == 1
    assert main(["score", str(run), str(imgs), "--tpr", "1.5"]) == 2


def test_ood_threshold_passes_the_target_fraction(trained_runs):
    model = jemtorch.load(trained_runs / "jem")
    run = jemtorch.load_run(trained_runs / "jem")
    val = training_splits(run.data, run.cfg.n_valid, run.cfg.seed, "cpu").x_val
    for tpr in (0.5, 0.8, 0.95):
        for score in ("logp", "gradnorm"):
            flagged = model.score(to_float(val), tpr=tpr, score=score)["ood"].mean()
            assert abs(flagged - (1 - tpr)) <= 0.02, (tpr, score, flagged)
    uniform = torch.rand(200, *model.input_shape) * 2 - 1
    flagged = [model.score(uniform, tpr=tpr)["ood"].mean() for tpr in (0.5, 0.8, 0.95)]
    assert flagged[0] >= flagged[1] >= flagged[2]  # a stricter threshold flags more
    with pytest.raises(ValueError, match="float images must be model units"):
        model.predict(torch.zeros(2, 1, 9, 9))


def test_export_roundtrip_identical_logits(trained_runs, tmp_path, capsys):
    run, out = trained_runs / "jem", tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["detectors.safetensors", "model.json", "model.safetensors"]
    card = json.loads((out / "model.json").read_text())
    assert card["classes"] == [str(i) for i in range(10)] and card["input_shape"] == [1, 8, 8]
    assert card["architecture"]["model"] == "cnn-8" and card["ood"]["score"] in DETECTORS
    assert card["training"]["test_accuracy"] == json.loads((run / "summary.json").read_text())["test_accuracy"]
    from_run, from_export = jemtorch.load(run), jemtorch.load(out)
    assert not from_export.jem.training and from_export.classes == from_run.classes
    x = load_dataset("digits").x_test[:50]
    assert torch.equal(from_run.logits(x), from_export.logits(x))
    s_run, s_exp = from_run.score(x), from_export.score(x)
    assert np.array_equal(s_run["ood"], s_exp["ood"])  # the same thresholds travel with the export
    x_val, y_val = from_run.validation_split()  # the run's own split, as training drew it; an export has none
    split = training_splits(from_run.run_data, from_run.run_cfg.n_valid, from_run.run_cfg.seed, "cpu")
    assert len(x_val) > 0 and torch.equal(x_val, split.x_val) and torch.equal(y_val, split.y_val)
    with pytest.raises(ValueError, match="is an export"):
        from_export.validation_split()
    # no pickles: the weights are a safetensors file
    from safetensors.torch import load_file

    assert set(load_file(str(out / "model.safetensors"))) == set(from_run.jem.f.state_dict())
    # an export never replaces an earlier one silently, nor writes into a folder of other files
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    # a scored export works like a scored run
    assert main(["score", str(out), str(tmp_path / "mine"), "--no-progress"]) == 1  # no images there: exit 1
    # an export without detectors (jemtorch 0.1's) scores with the own scores that need no fit
    card.pop("detectors")
    (out / "model.json").write_text(json.dumps(card))
    (out / "detectors.safetensors").unlink()
    bare = jemtorch.load(out)
    assert bare.detectors.names == ("logp", "maxprob", "gradnorm")
    assert len(bare.score(x, score="logp")["ood"]) == len(x)


def test_export_onnx_matches_torch(trained_runs, tmp_path):
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    out = tmp_path / "export"
    assert main(["export", str(trained_runs / "base"), "--out", str(out), "--onnx"]) == 0
    x = to_float(load_dataset("digits").x_test[:7])
    got = ReferenceEvaluator(str(out / "model.onnx")).run(None, {"images": x.numpy()})[0]
    want = jemtorch.load(out).logits(x).numpy()
    assert np.allclose(got, want, atol=1e-4)


def test_eval_ood_from_any_folder(trained_runs, tmp_path, capsys):
    flat = tmp_path / "my-photos"
    digits_pngs(flat, 20, size=12, rgb=True)  # flat folder, no classes, no train/
    classed = tmp_path / "deep" / "my-photos"
    digits_pngs(classed / "x", 5)
    digits_pngs(classed / "y", 5, start=5)
    run = trained_runs / "base"
    assert main(["eval", str(run), "--ood", f"uniform,{flat},{classed}", *EVAL_TINY]) == 0
    m = json.loads((run / "eval/metrics.json").read_text())
    assert set(m["ood"]) == {"uniform", "my-photos", "my-photos-2"}
    assert m["ood"]["my-photos"]["n"] == 20 and m["ood"]["my-photos-2"]["n"] == 10
    assert 0 <= m["ood"]["my-photos"]["logp"]["auroc"] <= 1
    assert main(["eval", str(run), "--ood", str(tmp_path / "nope"), *EVAL_TINY]) == 2
    assert "OOD folder" in capsys.readouterr().err
    # a split folder is named with its dataset's folder, so two datasets' test/ folders do not read "test", "test-2"
    assert ood_labels(["data/cifar100/test/", "other/test", "x/my-photos", "mnist"]) == {
        "data/cifar100/test/": "cifar100-test", "other/test": "other-test", "x/my-photos": "my-photos", "mnist": "mnist"}


def test_kmnist_by_name(tmp_path):
    with pytest.raises(DatasetError, match="KMNIST not found"):
        load_dataset("kmnist", tmp_path)


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb-run"
    assert main(["train", *TINY, "--tensorboard", "--sample-every", "10", "--inject-divergence", "15",
                 "--out", str(run)]) == 0
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/energy_gap", "train/lr", "train/train_acc", "eval/val_accuracy",
                "events/rollbacks"):
        assert tag in tags["scalars"], tag
    assert "samples/unconditional" in tags["images"]
    log = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in log if r["kind"] == "train"]
    assert [e.step for e in acc.Scalars("train/loss")] == train_steps


FACTORY = '''
import torch.nn as nn

def tiny(in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))

def wrong(in_channels, num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
'''


def test_user_model_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--model", "mymodels:tiny", "--out", "r1"]) == 0
    cfg = json.loads((tmp_path / "r1/config.json").read_text())
    assert cfg["model"] == "mymodels:tiny"
    # a run that names user code loads only when told to trust it (it may have come from someone else)
    with pytest.raises(ValueError, match="is user code .*--trust-code"):
        jemtorch.load(tmp_path / "r1")
    assert main(["score", "r1", "r1", "--no-progress"]) == 2
    assert "--trust-code" in capsys.readouterr().err
    assert jemtorch.load(tmp_path / "r1", trust_code=True).predict(torch.zeros(3, 1, 8, 8)).shape == (3,)
    assert main(["train", "--resume", "r1", "--epochs", "2", "--no-progress"]) == 2  # resuming reads the run's name
    assert "--trust-code" in capsys.readouterr().err
    assert main(["train", "--resume", "r1", "--epochs", "2", "--no-progress", "--trust-code"]) == 0
    # a file path works too, and is stored absolute so the run loads from anywhere
    assert main(["train", *TINY, "--model", "mymodels.py:tiny", "--p-x-weight", "0", "--out", "r2"]) == 0
    stored = json.loads((tmp_path / "r2/config.json").read_text())["model"]
    assert stored == f"{tmp_path / 'mymodels.py'}:tiny"
    monkeypatch.chdir(tmp_path.parent)
    assert jemtorch.load(tmp_path / "r2", trust_code=True).predict(torch.zeros(2, 1, 8, 8)).shape == (2,)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for bad, msg in (("nosuchmodule:f", "cannot import nosuchmodule"), ("mymodels:absent", "no callable"),
                     ("mymodels:wrong", "logits of shape (batch, 10)")):
        assert main(["train", *TINY, "--model", bad, "--out", "bad"]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
