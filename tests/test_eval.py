import json

import numpy as np
import pytest
import torch

from jemtorch import JEM, create_model
from jemtorch.build import load_run
from jemtorch.cli import main
from jemtorch.data import DatasetError, convert_images, make_ood_set
from jemtorch.detectors import DETECTORS, FittedDetectors
from jemtorch.evaluate import fresh_chain_path, fresh_samples
from jemtorch.metrics import (
    _counted_ood,
    bootstrap_accuracy,
    bootstrap_ece,
    bootstrap_ood,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    frechet_distance,
    frechet_distance_infinity,
    ood_metrics,
    paired_difference,
)

TINY = ["--model", "cnn-4", "--sgld-steps", "1", "--buffer-size", "100", "--epochs", "1", "--no-progress"]
EVAL_TINY = ["--n", "60", "--sample-steps", "2", "--n-samples", "20", "--n-gen", "40", "--no-progress"]


def test_ece_zero_when_perfectly_calibrated():
    # confidence 0.8 on every input and exactly 80% of predictions right
    probs = torch.tensor([[0.8, 0.2]] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert calibration_bins(probs, labels)["ece"] == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)


def test_ece_of_overconfident_model_and_agreement_with_torchmetrics():
    probs = torch.tensor([[0.9, 0.1]] * 10)
    labels = torch.tensor([0] * 5 + [1] * 5)  # 50% accurate at 90% confidence
    assert calibration_bins(probs, labels)["ece"] == pytest.approx(0.4, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(500, 10, generator=g) * 3, 1)
    y = torch.randint(0, 10, (500,), generator=g)
    for bins in (5, 15):
        assert calibration_bins(p, y, bins)["ece"] == pytest.approx(expected_calibration_error(p, y, bins), abs=1e-5)
    cal = calibration_bins(p, y, 15)
    assert sum(cal["count"]) == 500 and len(cal["accuracy"]) == 15


def test_bootstrap_ece_resamples_are_shared_and_give_a_paired_interval():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (400,), generator=g)
    sharp = torch.softmax(torch.randn(400, 10, generator=g) * 4, 1)
    boot = bootstrap_ece(sharp, y, 15, n_boot=250, seed=3)
    # replicate i is the ECE of resample i: the i-th row of the draws the function makes (100 rows at a time)
    pick = torch.randint(400, (100, 400), generator=torch.Generator().manual_seed(3))[7]
    assert boot[7] == pytest.approx(calibration_bins(sharp[pick], y[pick], 15)["ece"], abs=1e-6)
    assert len(boot) == 250 and np.allclose(boot, bootstrap_ece(sharp, y, 15, n_boot=250, seed=3))
    same = paired_difference(boot, bootstrap_ece(sharp, y, 15, n_boot=250, seed=3), 0.0)
    assert same["ci"] == [0.0, 0.0]  # a model against itself: every resample agrees
    flat = torch.full_like(sharp, 0.1)  # always 10% confident: ECE = |accuracy − 0.1| ≈ 0 on random labels
    d = paired_difference(boot, bootstrap_ece(flat, y, 15, n_boot=250, seed=3),
                          calibration_bins(sharp, y)["ece"] - calibration_bins(flat, y)["ece"])
    assert 0 < d["ci"][0] <= d["diff"] <= d["ci"][1] and d["n_boot"] == 250  # the over-confident one is worse


def test_bootstrap_accuracy_uses_the_ece_resamples_and_pairs_two_models():
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 10, (300,), generator=g)
    probs = torch.softmax(torch.randn(300, 10, generator=g), 1)
    right = probs.argmax(1) == y
    boot = bootstrap_accuracy(right, n_boot=150, seed=4)
    # replicate i is the accuracy of resample i: the draws bootstrap_ece makes with the same seed (100 rows at a time)
    pick = torch.randint(300, (100, 300), generator=torch.Generator().manual_seed(4))[5]
    assert boot[5] == pytest.approx(right[pick].double().mean().item())
    assert sum(calibration_bins(probs[pick], y[pick], 1)["accuracy"]) == pytest.approx(boot[5])
    better = right | (torch.arange(300) % 10 == 0)  # the same predictions, right on up to a tenth more images
    d = paired_difference(bootstrap_accuracy(better, 150, 4), boot,
                          better.double().mean().item() - right.double().mean().item())
    assert 0 < d["ci"][0] <= d["diff"] <= d["ci"][1]  # no resample sees the better model behind
    assert paired_difference(boot, bootstrap_accuracy(right, 150, 4), 0.0)["ci"] == [0.0, 0.0]


def test_temperature_scaling_undoes_overconfidence():
    """Labels drawn from softmax(z); logits 3z are over-confident by T = 3, which the fit must recover."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=g) * 2
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    t = fit_temperature(3 * z, y)
    assert t == pytest.approx(3.0, rel=0.05)
    over = expected_calibration_error((3 * z).softmax(1), y)
    after = expected_calibration_error((3 * z / t).softmax(1), y)
    assert after < 0.02 < over


def test_ood_metrics_extremes():
    sep = ood_metrics(np.array([2.0, 3.0, 4.0]), np.array([-1.0, 0.0, 1.0]))
    assert sep["auroc"] == 1.0 and sep["aupr"] == 1.0 and sep["fpr95"] == 0.0
    same = ood_metrics(np.zeros(100), np.zeros(100))
    assert same["auroc"] == 0.5 and same["fpr95"] == 1.0
    flipped = ood_metrics(np.array([-1.0, 0.0]), np.array([2.0, 3.0]))
    assert flipped["auroc"] == 0.0


def test_bootstrap_ood_counts_images_as_ood_metrics_does_and_pairs_detectors():
    rng = np.random.default_rng(0)
    s_in, s_out = np.round(rng.normal(1, 1, 300), 1), np.round(rng.normal(0, 1, 250), 1)  # many ties
    every_image_once = _counted_ood(s_in, s_out)(np.ones(300, int), np.ones(250, int))
    m = ood_metrics(s_in, s_out)
    assert every_image_once == pytest.approx((m["auroc"], m["fpr95"]))
    twice = np.r_[s_in, s_in[:7]], np.r_[s_out, s_out[-3:]]  # counts are images drawn that many times
    w_in, w_out = np.ones(300, int) + (np.arange(300) < 7), np.ones(250, int) + (np.arange(250) >= 247)
    m2 = ood_metrics(*twice)
    assert _counted_ood(s_in, s_out)(w_in, w_out) == pytest.approx((m2["auroc"], m2["fpr95"]))
    noisy = s_in + 1.5 * rng.normal(size=300)  # the same images, scored by a worse detector
    a, b = bootstrap_ood(s_in, s_out, 200, seed=1), bootstrap_ood(noisy, s_out, 200, seed=1)
    assert a.shape == (200, 2) and np.allclose(a, bootstrap_ood(s_in, s_out, 200, seed=1))
    assert paired_difference(a[:, 0], a[:, 0], 0.0)["ci"] == [0.0, 0.0]  # a detector against itself
    d = paired_difference(a[:, 0], b[:, 0], m["auroc"] - ood_metrics(noisy, s_out)["auroc"])
    assert 0 < d["ci"][0] <= d["diff"] <= d["ci"][1]  # the paired interval tells the better one


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = a + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(1.0, abs=1e-6)  # mean shift only
    c = 2 * rng.normal(size=(20000, 3))
    assert frechet_distance(rng.normal(size=(20000, 3)), c) == pytest.approx(3 * (1 + 4 - 2 * 2), abs=0.15)


def test_frechet_distance_infinity_removes_most_of_the_small_sample_bias():
    """Two Gaussians of known FD (64 dimensions, 400 images each): the FD of the 400 is biased up by about k/n,
    FD∞ (extrapolated from subsets of 200-400) lands within 2.5 of the truth where the plain FD is 7 above it."""
    rng = np.random.default_rng(0)
    d = 64
    truth = d * 0.3**2 + d * (1 + 1.5**2 - 2 * 1.5)  # mean shift, and covariances I and 2.25 I
    for seed in range(3):
        a, b = rng.normal(size=(400, d)), rng.normal(size=(400, d)) * 1.5 + 0.3
        o = frechet_distance_infinity(a, b, seed=seed)
        assert frechet_distance(a, b) - truth > 6 and abs(o["fd_inf"] - truth) < 2.5 and o["slope"] > 0
        assert min(o["sizes"]) == 200 and max(o["sizes"]) == 400 and len(o["fd"]) == len(o["sizes"]) == 16
    with pytest.raises(ValueError, match="FD∞ needs"):
        frechet_distance_infinity(a[:2], b[:2])


@pytest.mark.parametrize("n_a,n_b,dim", [(300, 200, 40), (60, 80, 200)])  # fewer features than samples, and more
def test_frechet_distance_matches_the_matrix_square_root(n_a, n_b, dim):
    from scipy.linalg import sqrtm
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a, b = rng.normal(size=(n_a, dim)) @ mix, rng.normal(size=(n_b, dim)) @ mix.T + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_gradnorm_score_matches_finite_differences():
    torch.manual_seed(0)
    jem = JEM(create_model("cnn-2", in_channels=1, num_classes=3)).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.double)
    scores = FittedDetectors({k: DETECTORS[k]() for k in ("logp", "maxprob", "gradnorm")}, {}).score(jem, x)
    eps = 1e-6
    for b in range(2):
        grad = torch.zeros(16, dtype=torch.double)
        for i in range(16):
            d = torch.zeros(16, dtype=torch.double)
            d[i] = eps
            xp, xm = x[b : b + 1] + d.view(1, 1, 4, 4), x[b : b + 1] - d.view(1, 1, 4, 4)
            grad[i] = (jem.log_px(xp) - jem.log_px(xm)).item() / (2 * eps)
        assert scores["gradnorm"][b] == pytest.approx(-grad.norm().item(), rel=1e-5)
        assert scores["logp"][b] == pytest.approx(jem.log_px(x[b : b + 1]).item(), rel=1e-9)
    probs = jem(x).softmax(1).max(1).values.detach().numpy()
    np.testing.assert_allclose(scores["maxprob"], probs)


def test_ood_set_constructors():
    x_in = torch.rand(30, 3, 8, 8) * 2 - 1
    for name in ("uniform", "gaussian", "constant", "interp"):
        x = make_ood_set(name, x_in, 17, seed=1)
        assert x.shape == (17, 3, 8, 8) and x.min() >= -1 and x.max() <= 1, name
    const = make_ood_set("constant", x_in, 5)
    assert (const.flatten(2).std(2) == 0).all()
    interp = make_ood_set("interp", x_in, 200)
    assert torch.isin(interp[0].flatten()[:1], (0.5 * x_in[:, None] + 0.5 * x_in[None]).flatten()).all()
    with pytest.raises(DatasetError, match="unknown OOD set"):
        make_ood_set("noise", x_in, 5)
    with pytest.raises(DatasetError, match="in-distribution"):
        make_ood_set("digits", x_in, 5, in_dataset="digits")


def test_convert_images():
    grey = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    rgb = convert_images(grey, (3, 32, 32))
    assert rgb.shape == (4, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 1])
    back = convert_images(torch.full((2, 3, 8, 8), 100, dtype=torch.uint8), (1, 8, 8))
    assert back.shape == (2, 1, 8, 8) and (back == 100).all()
    digits_as_cifar = make_ood_set("digits", torch.zeros(3, 3, 32, 32), 10)
    assert digits_as_cifar.shape == (10, 3, 32, 32)


def test_eval_end_to_end_two_runs(trained_runs, capsys):
    jem, base = trained_runs / "jem", trained_runs / "base"
    assert main(["eval", str(jem), str(base), *EVAL_TINY, "--ood", "interp,uniform,constant,gaussian"]) == 0
    m = json.loads((jem / "eval/metrics.json").read_text())
    summary = json.loads((jem / "summary.json").read_text())
    assert m["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert 0 <= m["ece"] <= 1 and m["ece_bins"] == 15
    assert 0 <= m["ece_ts"] <= 1 and m["temperature"] > 0 and m["calibration_ts"]["n_bins"] == 15
    assert m["steepness"]["boundary_l2"] > 0 and m["steepness"]["energy_grad_rms"] > 0
    mb = json.loads((base / "eval/metrics.json").read_text())
    versus = m["ece_vs_reference"]  # the baseline is the reference: the JEM's ECE minus its, paired bootstrap
    assert versus["reference"] == "base" and "ece_vs_reference" not in mb
    assert versus["raw"]["diff"] == pytest.approx(m["ece"] - mb["ece"])
    assert versus["ts"]["diff"] == pytest.approx(m["ece_ts"] - mb["ece_ts"])
    assert versus["raw"]["ci"][0] < versus["raw"]["ci"][1] and versus["raw"]["n_boot"] == 1000
    acc = m["accuracy_vs_reference"]  # the same for the test accuracy
    assert acc["reference"] == "base" and acc["diff"] == pytest.approx(m["test_accuracy"] - mb["test_accuracy"])
    assert acc["ci"][0] <= acc["diff"] <= acc["ci"][1] and "accuracy_vs_reference" not in mb
    lo, hi = m["ece_bootstrap"]["raw"]["ci"]
    assert 0 <= lo < hi <= 1 and m["ece_bootstrap"]["raw"]["n_boot"] == 1000
    for ood in ("interp", "uniform", "constant", "gaussian"):
        for score in m["detectors"]["names"]:
            assert set(m["ood"][ood][score]) == {"auroc", "aupr", "fpr95"}
    gen = m["generation"]  # samples measured in the baseline's features: FD and its accuracy on class samples
    assert {"chain starts (0 steps)", "fresh chains (2 steps)", "replay buffer"} <= set(gen["fd_ref"])
    assert all(0 <= a <= 1 for a in gen["ref_accuracy"].values())
    fd = m["generation"]["fd_ref"]
    assert fd["real train (floor)"] < fd["uniform noise"]  # the baseline run served as reference
    assert set(gen["fd_inf"]) == set(fd) and gen["fd_inf"]["real train (floor)"] < fd["real train (floor)"]
    assert "FD∞" in gen["fd_ref_protocol"] and "keeps part of that bias (the floor's FD∞; --n-gen" in gen["fd_ref_protocol"]
    fit = gen["fd_inf_fit"]["real train (floor)"]  # the points FD∞ is read from: the FD at the largest m is fd's
    assert fit["fd_inf"] == gen["fd_inf"]["real train (floor)"] and fit["fd"][-1] == pytest.approx(fd["real train (floor)"])
    assert "skipped" in m["generation"]["inception"]
    for name in ("report.html", "report.md", "reliability.png", "ood_hist_logp.png", "samples_fresh.png",
                 "samples_buffer.png", "samples_fresh_cond.png"):
        assert (jem / "eval" / name).is_file(), name
    html = (jem / "eval/report.html").read_text()
    assert "data:image/png;base64," in html and "base" in html and "jem" in html
    assert "ECE − reference" in (jem / "eval/report.md").read_text()
    assert not (base / "eval/samples_buffer.png").exists()  # a baseline has no replay buffer


def test_fresh_chains_measured_on_the_way_are_the_same_chains(trained_runs):
    """fresh_chain_path stops at the given lengths and continues: the chains at the longest equal one uninterrupted
    run (noise included: the same seed, the same draws in the same order)."""
    run = load_run(trained_runs / "jem", device="cpu")
    y = torch.arange(6) % run.data.num_classes
    whole = fresh_samples(run, 6, 7, y=y, seed=3)
    path = fresh_chain_path(run, 6, (5, 2, 7), y=y, seed=3)
    assert list(path) == [2, 5, 7] and torch.allclose(path[7], whole, atol=1e-6)
    assert not torch.equal(path[2], path[7])  # the chains moved on


def test_eval_sample_step_cap_reaches_the_fresh_chains(run_copy, capsys):
    """--sample-step-cap replaces the run's step cap for the fresh chains only: recorded beside the samples, named
    in the report's caption; the run's own config is untouched. Not > 0: a one-line error, nothing written."""
    jem = run_copy("jem")
    trained = json.loads((jem / "config.json").read_text())
    assert main(["eval", str(jem), "--sample-step-cap", "0", *EVAL_TINY, "--ood", "uniform"]) == 2
    assert "--sample-step-cap must be > 0" in capsys.readouterr().err and not (jem / "eval").exists()
    assert main(["eval", str(jem), "--sample-step-cap", "0.001", *EVAL_TINY, "--ood", "uniform"]) == 0
    m = json.loads((jem / "eval/metrics.json").read_text())
    assert m["samples"]["sgld_step_cap"] == 0.001 and m["samples"]["sample_steps"] == 2
    assert "step cap 0.001" in (jem / "eval/report.md").read_text()
    assert json.loads((jem / "config.json").read_text()) == trained
    assert main(["eval", str(jem), *EVAL_TINY, "--ood", "uniform"]) == 0  # default: the run's own cap
    assert json.loads((jem / "eval/metrics.json").read_text())["samples"]["sgld_step_cap"] == trained["sgld_step_cap"]
    (jem / "config.json").write_text(json.dumps({**trained, "sample_step_cap": 0.002}))  # the run's sampling cap
    assert main(["eval", str(jem), *EVAL_TINY, "--ood", "uniform"]) == 0
    assert json.loads((jem / "eval/metrics.json").read_text())["samples"]["sgld_step_cap"] == 0.002
    pyld = {**trained, "sgld_update": "pyld", "sgld_step_cap": 0.0}  # no step cap to change: an error naming the flag
    (jem / "config.json").write_text(json.dumps(pyld))
    before = (jem / "eval/metrics.json").read_text()
    assert main(["eval", str(jem), "--sample-step-cap", "0.01", *EVAL_TINY, "--ood", "uniform"]) == 2
    assert "--sample-step-cap applies to --sgld-update sgld and clamped" in capsys.readouterr().err
    assert (jem / "eval/metrics.json").read_text() == before


def test_eval_bad_inputs(trained_runs, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["eval", str(trained_runs / "jem"), "--ood", "nonsense", *EVAL_TINY]) == 2
    assert "unknown OOD set" in capsys.readouterr().err
    assert main(["eval", str(trained_runs / "jem"), "--ood", "digits", *EVAL_TINY]) == 2
    assert "in-distribution dataset" in capsys.readouterr().err
    assert main(["eval", str(trained_runs / "jem"), "--ood", "mnist", "--data-root", str(tmp_path), *EVAL_TINY]) == 2
    assert "MNIST not found" in capsys.readouterr().err
    assert main(["eval", str(trained_runs / "jem"), "--ood", "mnist", "--ood-root", str(tmp_path / "x"), *EVAL_TINY]) == 2
    assert f"{tmp_path / 'x'}/MNIST/raw" in capsys.readouterr().err


def test_eval_incompatible_runs(trained_runs, tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(12):
                Image.fromarray(np.full((6, 6, 3), 20 * i, np.uint8)).save(tmp_path / "img" / split / cls / f"{i}.png")
    other = tmp_path / "other"
    assert main(["train", *TINY, "--dataset", "imagefolder", "--data-root", str(tmp_path / "img"), "--batch-size", "8",
                 "--out", str(other)]) == 0
    assert main(["eval", str(trained_runs / "jem"), str(other), *EVAL_TINY]) == 2
    assert "incompatible runs" in capsys.readouterr().err
