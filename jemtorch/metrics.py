"""Metric functions on plain tensors/arrays: calibration, OOD detection, Fréchet distance.

Library implementations are used where they exist (torchmetrics' calibration error, scikit-learn's ROC/PR);
the per-bin statistics for reliability diagrams and the Fréchet distance are computed here.
"""
from __future__ import annotations

import numpy as np
import torch


def require_finite(name: str, *arrays) -> None:
    """Metrics of non-finite inputs are meaningless numbers: refuse them, naming what was not finite."""
    for a in arrays:
        finite = torch.isfinite(a).all().item() if isinstance(a, torch.Tensor) else np.isfinite(np.asarray(a, np.float64)).all()
        if not finite:
            raise ValueError(f"{name}: inputs are not finite (NaN or infinite scores: the model's weights are broken)")


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """Equal-width confidence bins over (0, 1]: per bin count, mean confidence, accuracy; and the ECE they give."""
    require_finite("calibration", probs)
    conf, correct, idx = _confidence_bins(probs, labels, n_bins)
    edges = torch.linspace(0, 1, n_bins + 1)
    count = torch.bincount(idx, minlength=n_bins).float()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    nz = count.clamp(min=1)
    ece = ((conf_sum - acc_sum).abs().sum() / max(len(labels), 1)).item()
    return {"edges": edges.tolist(), "count": count.long().tolist(), "confidence": (conf_sum / nz).tolist(),
            "accuracy": (acc_sum / nz).tolist(), "ece": ece, "n_bins": n_bins}


def _confidence_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int):
    """Per image: confidence, correctness (float) and its equal-width bin; bin i holds confidences in
    (i/n_bins, (i+1)/n_bins]."""
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, n_bins + 1)
    return conf, (pred == labels).float(), torch.bucketize(conf, edges[1:-1], right=False).clamp(max=n_bins - 1)


def bootstrap_resamples(n: int, n_boot: int = 1000, seed: int = 0):
    """The bootstrap resamples of ``n`` test images, drawn with replacement, 100 at a time: ``(start, picks)`` with
    ``picks`` of shape (≤ 100, n). They depend only on (``n``, ``n_boot``, ``seed``): every statistic of every model
    scored on the same test set gets the same resamples, so the differences of two models' replicates give a paired
    interval for the difference of the statistic (the test images' own sampling noise, not the training's)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n_boot, 100):  # (100, n) indices at a time: a few MB
        yield start, torch.randint(n, (min(100, n_boot - start), n), generator=g)


def bootstrap_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, n_boot: int = 1000,
                  seed: int = 0) -> np.ndarray:
    """ECE (the binning of ``calibration_bins``) of the ``n_boot`` shared resamples of the images
    (``bootstrap_resamples``)."""
    require_finite("bootstrap ECE", probs)
    conf, correct, idx = _confidence_bins(probs.detach().cpu().double(), labels.cpu(), n_bins)
    n = len(labels)
    out = np.empty(n_boot)
    for start, pick in bootstrap_resamples(n, n_boot, seed):
        rows = torch.arange(len(pick)).unsqueeze(1).expand_as(pick)
        key = (rows * n_bins + idx[pick]).flatten()  # (resample, bin) → one flat slot
        gap = torch.zeros(len(pick) * n_bins, dtype=torch.float64)
        gap.index_add_(0, key, (conf[pick] - correct[pick]).flatten())
        out[start:start + len(pick)] = gap.view(len(pick), n_bins).abs().sum(1).numpy() / n
    return out


def bootstrap_accuracy(correct: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Accuracy (``correct``: one bool per image) of the ``n_boot`` shared resamples (``bootstrap_resamples``)."""
    c = correct.detach().cpu().double()
    out = np.empty(n_boot)
    for start, pick in bootstrap_resamples(len(c), n_boot, seed):
        out[start:start + len(pick)] = c[pick].mean(1).numpy()
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, point: float, level: float = 0.95) -> dict:
    """``point`` (a statistic of model A minus model B) with the percentile interval of the paired bootstrap
    replicates ``a - b``."""
    d = np.asarray(a) - np.asarray(b)
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(point), "ci": [float(lo), float(hi)], "level": level, "n_boot": len(d)}


def verdict(ci, higher_is_better: bool = True) -> str:
    """A paired difference's verdict from its interval ``ci`` = [lo, hi]: "won" or "lost" when it excludes 0, else
    "tied" (for a rate where lower is better, such as FPR95, ``higher_is_better=False``)."""
    better, worse = (ci[0] > 0, ci[1] < 0) if higher_is_better else (ci[1] < 0, ci[0] > 0)
    return "won" if better else "lost" if worse else "tied"


def format_difference(d: dict | None) -> str:
    """A :func:`paired_difference` of two rates as "+0.37 [-0.10, +0.74]" (percentage points); "—" when absent."""
    return f"{100 * d['diff']:+.2f} [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}]" if d else "—"


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (L1, equal-width bins) via torchmetrics."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    require_finite("ECE", probs)

    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def ood_metrics(score_in: np.ndarray, score_out: np.ndarray) -> dict:
    """In-distribution is the positive class; a higher score must mean 'more in-distribution'.

    auroc: area under ROC; aupr: average precision with in-distribution positive; fpr95: fraction of OOD inputs
    accepted at the threshold that accepts 95% of in-distribution inputs.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s_in, s_out = np.asarray(score_in, np.float64), np.asarray(score_out, np.float64)
    require_finite("OOD metrics", s_in, s_out)
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)), "aupr": float(average_precision_score(y, s)),
            "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")])}


def bootstrap_ood(score_in: np.ndarray, score_out: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """AUROC and FPR95 (``ood_metrics``' definitions) of ``n_boot`` resamples, drawn with replacement from the
    in-distribution and the OOD images separately: an (n_boot, 2) array.

    As in ``bootstrap_ece``, the resamples depend only on (the two set sizes, ``n_boot``, ``seed``): two detectors
    that scored the same images get the same resamples, and the differences of their replicates give a paired
    interval for the difference of their AUROCs (or FPR95s) — the images' sampling noise, not the training's."""
    s_in, s_out = np.asarray(score_in, np.float64), np.asarray(score_out, np.float64)
    require_finite("bootstrap OOD metrics", s_in, s_out)
    measure = _counted_ood(s_in, s_out)
    rng = np.random.default_rng(seed)
    n, m = len(s_in), len(s_out)
    return np.array([measure(np.bincount(rng.integers(n, size=n), minlength=n),
                             np.bincount(rng.integers(m, size=m), minlength=m)) for _ in range(n_boot)]).reshape(-1, 2)


def _counted_ood(s_in: np.ndarray, s_out: np.ndarray):
    """A function of per-image counts (how often each in-distribution and each OOD image is drawn) giving the
    (AUROC, FPR95) of the images so drawn; all ones: ``ood_metrics``' figures. The scores are sorted once here, so
    each resample costs a cumulative sum, not a sort."""
    order_in, order_out = np.argsort(s_in, kind="stable"), np.argsort(s_out, kind="stable")
    sorted_in, sorted_out = s_in[order_in], s_out[order_out]
    below = np.searchsorted(sorted_out, s_in, "left")  # per in-image: how many OOD scores are lower ...
    at_most = np.searchsorted(sorted_out, s_in, "right")  # ... and lower or equal (ties count half in the AUROC)
    out_below = np.searchsorted(sorted_out, sorted_in, "left")  # OOD scores under each in-score as a threshold

    def measure(w_in: np.ndarray, w_out: np.ndarray) -> tuple[float, float]:
        n_in, n_out = w_in.sum(), w_out.sum()
        cum_out = np.concatenate(([0], np.cumsum(w_out[order_out])))  # cum_out[k]: drawn OOD images among k lowest
        auroc = (w_in * (cum_out[below] + cum_out[at_most])).sum() / (2.0 * n_in * n_out)
        kept = np.cumsum(w_in[order_in][::-1])[::-1]  # kept[k]: drawn in-images scoring at least the k-th lowest
        k = np.nonzero(kept >= 0.95 * n_in)[0][-1]  # the highest threshold keeping 95% of them: TPR 95%
        return float(auroc), float((n_out - cum_out[out_below[k]]) / n_out)

    return measure


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the formula behind FID)."""
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"Fréchet distance: needs two sets of at least 2 feature vectors of one dimension (a covariance "
                         f"per set), got shapes {a.shape} and {b.shape}")
    require_finite("Fréchet distance", a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    trace_a, trace_b = (ca**2).sum() / (len(a) - 1), (cb**2).sum() / (len(b) - 1)
    return float(((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * trace_sqrt_product(ca, cb))


def frechet_distance_infinity(feat_a: np.ndarray, feat_b: np.ndarray, points: int = 6, repeats: int = 3,
                              smallest: float = 0.5, seed: int = 0) -> dict:
    """FD∞: the Fréchet distance extrapolated to infinitely many images (Chong & Forsyth, "Effectively Unbiased FID
    and Inception Score and where to find them", CVPR 2020). The FD of m images per set overestimates the
    distributions' by about k/m; this measures it on random subsets of m images of both sets at ``points`` sizes
    spaced evenly from ``smallest`` × n to n (n: the smaller set; ``repeats`` subsets per size below n), fits FD_m =
    FD∞ + k/m by least squares and returns the intercept FD∞ with the slope k and the points. Their official code
    (mchong6/FID_IS_infinity, score_infinity.py, calculate_FID_infinity) fits 15 sizes from n/10 to n with one subset
    each, against fixed statistics of the real set; here both sets are subsampled (both are n images), and the sizes
    start at n/2 because FD_m bends away from the line once m falls well below the features' dimension (1 024 for
    cnn-silu-16: training against test images of Fashion-MNIST, m × FD_m = 6 700 at m = 100, 12 300 at 500, 13 700–
    14 000 from 1 000 to 4 000; there FD∞ leaves 2.6 of the FD's 13.8 at n = 1 000 and 9.1 of 24.7 at n = 500:
    benchmarks/fd_floor.py, docs/results/density.md). FD∞ is noisier than the FD at n, and can fall below 0 for two
    draws of one distribution."""
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    n = min(len(a), len(b))
    sizes = sorted({int(round(s)) for s in np.linspace(smallest * n, n, points)})
    if points < 2 or repeats < 1 or not 0 < smallest < 1 or len(sizes) < 2 or sizes[0] < 2:
        raise ValueError(f"FD∞ needs at least 2 subset sizes of at least 2 images (points >= 2, repeats >= 1, "
                         f"0 < smallest < 1), got {len(a)} and {len(b)} images, points={points}, smallest={smallest}")
    rng = np.random.default_rng(seed)
    ms, fds = [], []
    for m in sizes:
        for _ in range(1 if m == len(a) == len(b) else repeats):  # all of both sets: one subset
            fds.append(frechet_distance(a[rng.permutation(len(a))[:m]], b[rng.permutation(len(b))[:m]]))
            ms.append(m)
    slope, intercept = np.polyfit(1.0 / np.array(ms, np.float64), np.array(fds), 1)
    return {"fd_inf": float(intercept), "slope": float(slope), "sizes": ms, "fd": fds}


def trace_sqrt_product(ca: np.ndarray, cb: np.ndarray) -> float:
    """tr (A B)^½ for the covariances A, B of the centred rows ``ca``, ``cb``, with symmetric eigensolvers only, in
    whichever space is smaller. A B is similar to the PSD matrix A^½ B A^½, so tr (A B)^½ = Σ λ_i(A^½ B A^½)^½ (in the
    D feature dimensions); and A B = caᵀ ca cbᵀ cb / ((n_a−1)(n_b−1)) has the nonzero eigenvalues of M Mᵀ, M = ca cbᵀ,
    so it is also the sum of M's singular values over √((n_a−1)(n_b−1)) (in the n_a × n_b sample space). The general
    eigensolver on the D × D product this replaces grows with D³: 3.7 s per distance at D = 2 048 and 1 000 samples
    on one CPU thread, 0.4 s now (cnn-64's features have 4 096 dimensions)."""
    n_a, n_b, dim = len(ca), len(cb), ca.shape[1]
    if dim <= min(n_a, n_b):
        cov_a, cov_b = ca.T @ ca / (n_a - 1), cb.T @ cb / (n_b - 1)
        w, v = np.linalg.eigh(cov_a)
        root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
        return float(np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum())
    return float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt((n_a - 1) * (n_b - 1)))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T) on held-out data."""
    logits, labels = logits.detach().double(), labels.detach()
    require_finite("temperature scaling", logits)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())
