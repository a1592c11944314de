"""OOD detectors: each score equals pytorch-ood's on the same features (where it imports), fitting and storage per
weights, one-line errors for what cannot be fitted, and the commands that use them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jemtorch import JEM, create_model
from jemtorch.cli import main
from jemtorch.detectors import (
    DETECTORS,
    OWN,
    DetectorError,
    FittedDetectors,
    Outputs,
    ascent_rise,
    classifier_head,
    code_bits,
    detector_names,
    model_outputs,
    png_bits,
)

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n=600, d=24, c=4, seed=0):
    """Class-structured features and a linear head."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    z = torch.randn(n, d, generator=g) + 3 * torch.randn(c, d, generator=g)[y]
    head = torch.nn.Linear(d, c)
    torch.nn.init.normal_(head.weight, generator=g)
    return z, y, head


def fitted(name, z, y, head):
    det = DETECTORS[name]()
    out = Outputs(head(z).detach(), z)
    det.fit(out, y, head)
    det.load_state_dict(det.state_dict())  # scores come from the stored (float32) tensors, as in FittedDetectors
    return det


def test_every_detector_equals_pytorch_ood():
    """jemtorch computes its detectors itself (the core never needs torchvision); the definitions are pytorch-ood
    0.4's, and every score (higher = in-distribution) equals minus its outlier score on the same features, to 1e-4 of
    the scores' scale (pytorch-ood works in float32). pytorch-ood is imported in a process of its own
    (tests/ood_agreement.py says why), from this environment or from ``.ood/`` (the README's test command)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / ".ood"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(ROOT / "tests/ood_agreement.py")], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode == 3:
        pytest.skip("pytorch-ood does not import here (README: the test command installs it into .ood/)")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.count(" ok") == 7, r.stdout


def test_mahalanobis_and_knn_by_hand():
    """Checked without pytorch-ood too: the closest class mean under the shared covariance, the k-th cosine
    neighbour."""
    z, y, head = synthetic(d=6)
    maha = fitted("mahalanobis", z, y, head)
    mu = torch.stack([z[y == c].mean(0) for c in range(4)]).double()
    cov = sum((z[y == c].double() - mu[c]).T @ (z[y == c].double() - mu[c]) for c in range(4)) + 1e-6 * torch.eye(6)
    q = z[:5].double()
    d2 = torch.stack([((q - m) @ torch.linalg.inv(cov) * (q - m)).sum(1) for m in mu], 1)
    np.testing.assert_allclose(maha.score(Outputs(head(z[:5]).detach(), z[:5])), -0.5 * d2.min(1).values, rtol=1e-5)
    knn = fitted("knn", z, y, head)
    zn = z / z.norm(dim=1, keepdim=True)
    dist = torch.cdist(zn[:5], zn).sort(1).values[:, int(knn.k) - 1]
    np.testing.assert_allclose(knn.score(Outputs(head(z[:5]).detach(), z[:5])), -dist, atol=1e-4)


def test_fit_on_a_model_store_per_weights_and_refuse_strangers(tmp_path):
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    x = torch.rand(90, 1, 8, 8) * 2 - 1
    y = torch.arange(90) % 3
    dets = FittedDetectors.fit(jem, x, y)
    assert dets.names == tuple(DETECTORS) and dets.info["feature_dim"] == 16 * 16
    # cnn-4's 4×4 pooling of a 2×2 map repeats values: rank-deficient features, and a fit that says how it coped
    assert [n.split(";")[0] for n in dets.info["notes"]] == ["vim: the 256-dimensional features have rank 47"]
    scores = dets.score(jem, x[:7])
    assert set(scores) == set(DETECTORS) and all(len(v) == 7 and np.isfinite(v).all() for v in scores.values())
    dets.save(tmp_path / "d.safetensors", "abc")
    assert FittedDetectors.load(tmp_path / "d.safetensors", "other weights") is None  # fitted to other weights
    again = FittedDetectors.load(tmp_path / "d.safetensors", "abc").score(jem, x[:7])
    for k in scores:
        np.testing.assert_allclose(again[k], scores[k], rtol=1e-6, err_msg=k)
    (tmp_path / "d.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable detectors file"):
        FittedDetectors.load(tmp_path / "d.safetensors", "abc")
    other = JEM(create_model("cnn-8", in_channels=1, num_classes=3))
    with pytest.raises(DetectorError, match="fitted on 256-dimensional features"):
        dets.score(other, x[:3])


def test_a_fit_stored_before_webp_keeps_its_png_lengths_and_its_names(tmp_path):
    """A detectors file of FIT_VERSION 4 (exports keep theirs): no codec in its info, the length detector stored as
    png. It loads under its stored names and scores with the PNG lengths it was fitted on, as when it was written."""
    from safetensors.torch import save_file

    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    x, y = torch.rand(60, 1, 8, 8) * 2 - 1, torch.arange(60) % 3
    names = ("logp", "complexity", "length")
    out = model_outputs(jem, x, complexity=True, codec="png")
    old = {}
    for n in names:
        old[n] = DETECTORS[n]()
        old[n].fit(out, y, classifier_head(jem.f))
        old[n].load_state_dict(old[n].state_dict())  # as FittedDetectors.fit: scores from the stored precision
    tensors = {f"{'png' if n == 'length' else n}.{k}": v.contiguous() for n in names for k, v in old[n].state_dict().items()}
    info = {"n_images": 60, "feature_dim": 256, "notes": [], "version": 4, "detectors": ["logp", "complexity", "png"]}
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata={"weights_sha256": "abc", "info": json.dumps(info)})
    dets = FittedDetectors.load(tmp_path / "d.safetensors", "abc")
    assert dets.names == ("logp", "complexity", "png")
    got = dets.score(jem, x[:9])
    q = model_outputs(jem, x[:9], complexity=True, codec="png")
    np.testing.assert_allclose(got["png"], old["length"].score(q), rtol=1e-6)
    np.testing.assert_allclose(got["complexity"], old["complexity"].score(q), rtol=1e-6)
    fresh = FittedDetectors.fit(jem, x, y, names=names)
    assert fresh.info["codec"] == "webp" and fresh.info["version"] >= 5


def test_what_cannot_be_fitted_is_one_line():
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    x = torch.rand(20, 1, 8, 8) * 2 - 1
    with pytest.raises(DetectorError, match="mahalanobis: class 2 has fewer than 2"):
        FittedDetectors.fit(jem, x, torch.tensor([0] * 10 + [1] * 9 + [2]), names=("mahalanobis",))
    with pytest.raises(DetectorError, match="cannot fit the detectors on 1"):
        FittedDetectors.fit(jem, x[:1], torch.tensor([0]))
    z = torch.zeros(10, 4)  # degenerate features: the ridge keeps the fit finite (a regularised fit)
    maha = fitted("mahalanobis", z, torch.arange(10) % 2, torch.nn.Linear(4, 2))
    assert np.isfinite(maha.score(Outputs(torch.zeros(3, 2), torch.ones(3, 4)))).all()
    with torch.no_grad():
        jem.f.head.weight.fill_(float("nan"))
    with pytest.raises(DetectorError, match="not finite"):
        model_outputs(jem, x)
    with pytest.raises(DetectorError, match="unknown detector 'vm'"):
        detector_names("logp,vm")
    assert detector_names("vim, energy,msp") == ("logp", "maxprob", "vim")  # own scores first, aliases resolved


def test_typicality_is_the_density_of_energy_and_gradient_pairs():
    """Inputs too likely, too flat or too unlikely for the training split are atypical; the score is a kernel
    density of standardised (log p(x), log ‖∇ log p(x)‖) pairs, by hand."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 3, generator=g)
    grad = -torch.rand(500, generator=g) - 0.5
    det = DETECTORS["typicality"]()
    det.fit(Outputs(logits, torch.zeros(500, 2), grad), None, None)
    q = Outputs(torch.stack([logits[0], logits[0] + 30]), torch.zeros(2, 2), torch.tensor([grad[0], grad[0]]))
    s = det.score(q)
    assert s[0] > s[1] + 10  # a far higher log p(x) than any training image: atypical, although likelier
    pairs = torch.stack([logits.double().logsumexp(1), (-grad.double()).log()], 1)
    z = (pairs - pairs.mean(0)) / pairs.std(0)
    h = 500 ** (-1 / 6)
    d2 = ((z[:1, None] - z[None]) ** 2).sum(-1)
    by_hand = torch.logsumexp(-d2 / (2 * h * h), 1) - np.log(500 * 2 * np.pi * h * h)
    assert s[0] == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(DetectorError, match="needs the input gradient"):
        det.score(Outputs(logits[:2], torch.zeros(2, 2)))


def test_complexity_reads_compressed_lengths_and_flags_likely_but_simple_images():
    """Lossless bits/dim: a flat image is short, noise is long, under WebP (the default) and PNG alike, WebP shorter
    on an image with structure; the complexity score is the kernel density of (log p(x), log ‖∇ log p(x)‖, bits/dim),
    so an image as likely as the training images but far simpler is atypical — which typicality, blind to the length,
    cannot see; length is the length alone and never the default OOD flag."""
    g = torch.Generator().manual_seed(0)
    flat, noise = torch.zeros(1, 1, 16, 16), torch.rand(1, 1, 16, 16, generator=g) * 2 - 1
    bits = png_bits(torch.cat([flat, noise]))
    assert bits[0] < 3.0 < 8.0 < bits[1] < 12.0  # noise does not compress; ~70 bytes of headers on 256 pixels
    ramp = torch.linspace(-1, 1, 16).repeat(16, 1)[None, None]
    webp = code_bits(torch.cat([flat, noise, ramp]))
    assert webp[0] < 3.0 < 8.0 < webp[1] < 12.0 and webp[2] < png_bits(ramp)[0]
    assert torch.equal(code_bits(noise, "png"), png_bits(noise))
    with pytest.raises(DetectorError, match="unknown image codec 'gif'"):
        code_bits(noise, "gif")
    logits, grad = torch.randn(500, 3, generator=g), -torch.rand(500, generator=g) - 0.5
    cx = 4.0 + 0.2 * torch.randn(500, generator=g, dtype=torch.float64)
    train = Outputs(logits, torch.zeros(500, 2), grad, cx)
    dets = {n: DETECTORS[n]() for n in ("typicality", "complexity", "length")}
    for d in dets.values():
        d.fit(train, None, None)
    q = Outputs(logits[:1].repeat(2, 1), torch.zeros(2, 2), grad[:1].repeat(2), torch.tensor([4.0, 1.0], dtype=torch.float64))
    s = {n: d.score(q) for n, d in dets.items()}
    assert s["typicality"][0] == s["typicality"][1]  # the same (log p, gradient): typicality cannot tell them apart
    assert s["complexity"][0] > s["complexity"][1] + 10 and s["length"][0] > s["length"][1] + 10
    with pytest.raises(DetectorError, match="complexity needs the images' lengths"):
        dets["complexity"].score(Outputs(logits[:2], torch.zeros(2, 2), grad[:2]))
    assert DETECTORS["length"].model_free and not any(DETECTORS[n].model_free for n in OWN)
    assert detector_names("png,logp") == ("logp", "length")  # the length's name before FIT_VERSION 5


class Bowl(torch.nn.Module):
    """log p(x) = LogSumExp of a linear head over −x²: one mode at the all-zero image, slopes everywhere else."""

    def __init__(self, d=16, c=3):
        super().__init__()
        self.head = torch.nn.Linear(d, c)
        torch.nn.init.constant_(self.head.weight, 0.5)

    def forward(self, x):
        return self.head(-x.flatten(1) ** 2)


def test_ascent_rise_climbs_from_slopes_not_from_the_mode_and_each_image_alone():
    """The rise of log p(x) over ASCENT_STEPS capped ascent steps: zero at the mode, positive on a slope, bounded by
    what moves of at most ``cap`` RMS per pixel can climb, and the same for an image alone as in any batch."""
    from jemtorch.detectors import ASCENT_CAP, ASCENT_STEPS

    jem = JEM(Bowl())
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(1, 1, 4, 4), 0.5 * torch.ones(1, 1, 4, 4), torch.rand(6, 1, 4, 4, generator=g)])
    rise = ascent_rise(jem, x)
    assert rise[0] == 0 and (rise[1:] > 0).all()
    # log p(x) = −½‖x‖² + const, its gradient −x: a move of cap RMS per pixel climbs at most (RMS x)·cap·pixels
    assert rise[1] <= ASCENT_STEPS * 0.5 * ASCENT_CAP * 16 * (1 + 1e-6)
    alone = torch.cat([ascent_rise(jem, xi[None]) for xi in x])
    assert torch.allclose(alone, rise, rtol=1e-5, atol=1e-9)
    assert ascent_rise(jem, x[1:2], cap=1e-3) < rise[1]  # a shorter step climbs less


def test_ascent_flags_images_that_climb_more_than_the_training_images():
    """The ascent score is the kernel density of (log p(x), PNG bits/dim, log rise): an image as likely and as
    complex as the training images that climbs a thousand times further is atypical; without the rise it is refused
    with a one-line error; model_outputs fills the rise only when asked."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 3, generator=g)
    cx = 4.0 + 0.2 * torch.randn(500, generator=g, dtype=torch.float64)
    rise = (0.01 * torch.rand(500, generator=g, dtype=torch.float64) + 0.01)
    det = DETECTORS["ascent"]()
    det.fit(Outputs(logits, torch.zeros(500, 2), None, cx, rise), None, None)
    q = Outputs(logits[:1].repeat(2, 1), torch.zeros(2, 2), None, cx[:1].repeat(2), torch.tensor([rise[0], 10.0]))
    s = det.score(q)
    assert s[0] > s[1] + 10
    with pytest.raises(DetectorError, match="ascent needs the ascent rise"):
        det.score(Outputs(logits[:2], torch.zeros(2, 2), None, cx[:2]))
    jem = JEM(Bowl())
    x = torch.rand(5, 1, 4, 4, generator=g)
    assert model_outputs(jem, x, grad=False).rise is None
    out = model_outputs(jem, x, grad=False, ascent=True, batch_size=2)
    assert torch.allclose(out.rise, ascent_rise(jem, x)) and out.features.shape == (5, 16)  # chain passes not kept
    assert "ascent" in OWN and DETECTORS["ascent"].needs_ascent


def test_a_model_may_name_its_head():
    m = create_model("cnn-4", in_channels=1, num_classes=3)
    assert classifier_head(m) is m.head
    m.jemtorch_head = "features"
    with pytest.raises(DetectorError, match="not an nn.Linear"):
        classifier_head(m)


def test_eval_detectors_table_and_score_with_any_detector(trained_runs, tmp_path, capsys):
    jem, base = trained_runs / "jem", trained_runs / "base"
    assert main(["eval", str(jem), str(base), "--n", "60", "--sample-steps", "2", "--n-samples", "10", "--n-gen", "30",
                 "--ood", "uniform,constant", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "JEM's best own" in out and "best" in out
    m = json.loads((jem / "eval/metrics.json").read_text())
    assert m["detectors"]["names"][:6] == ["logp", "maxprob", "gradnorm", "typicality", "complexity", "ascent"]
    assert len(m["detectors"]["names"]) == 12 and m["detectors"]["own"] == list(OWN)
    assert set(m["ood"]["constant"]) >= {"vim", "knn", "mahalanobis", "react", "maxlogit"}
    for v in m["versus_posthoc"]:
        assert v["auroc_diff"] == pytest.approx(v["own_auroc"] - v["best_auroc"])
        for metric in ("auroc", "fpr95"):  # a paired interval, and the verdict it gives
            lo, hi = v[f"{metric}_diff_ci"]
            assert lo <= hi and v[f"{metric}_verdict"] in {"won", "lost", "tied"}
            assert (v[f"{metric}_verdict"] == "tied") == (lo <= 0 <= hi)
    base_name = json.loads((base / "eval/metrics.json").read_text())["name"]
    assert {v["best_run"] for v in m["versus_baseline"]} == {base_name}  # the classifier's detectors alone
    assert "best post-hoc" in (jem / "eval/report.md").read_text()
    assert (jem / "detectors.safetensors").is_file()  # fitted once, kept for these weights
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 255, (5, 8, 8), dtype=np.uint8))
    assert main(["score", str(base), str(tmp_path / "x.npy"), "--score", "vim", "--no-progress"]) == 0
    assert "vim <" in capsys.readouterr().err
    assert main(["export", str(base), "--out", str(tmp_path / "exp")]) == 0
    assert main(["score", str(tmp_path / "exp"), str(tmp_path / "x.npy"), "--score", "knn", "--no-progress"]) == 0
    assert main(["score", str(tmp_path / "exp"), str(tmp_path / "x.npy"), "--score", "vm", "--no-progress"]) == 2
    assert "--score must be one of" in capsys.readouterr().err
