"""Everything drawn: image grids (PNG, no matplotlib) and matplotlib figures (reliability diagrams, score
histograms, robustness curves, distal adversarials, training curves, replay-buffer sample grids).

Figures take plain data (dicts, arrays, tensors) and a path; they never read run directories or metrics files.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import copy_atomic, replace_atomic
from .data import to_uint8
from .energy import JEM


def make_grid(x: torch.Tensor, nrow: Optional[int] = None, pad: int = 2, min_tile: int = 48) -> np.ndarray:
    """x: (B, C, H, W) floats in [-1, 1] → uint8 image (H', W', 3) with ``nrow`` images per row."""
    x = to_uint8(x.detach().float().cpu())
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    b, _, h, w = x.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol_rows = math.ceil(b / nrow)
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = x.permute(0, 2, 3, 1).numpy()
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    return grid


def save_grid(x: torch.Tensor, path: str | Path, nrow: Optional[int] = None, min_tile: int = 48) -> Path:
    grid = Image.fromarray(make_grid(x, nrow=nrow, min_tile=min_tile))
    return replace_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))


def plt_module():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110, tight: bool = True) -> Path:
    if tight:  # tight_layout measures every tick label: half the cost of a small figure
        fig.tight_layout()
    try:
        return replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt_module().close(fig)


def reliability_figure(results: Sequence[dict], path: Path) -> Path:
    """Confidence vs accuracy per bin, one column per run, bin counts printed above the bars; a second row after
    temperature scaling where the results have it (``calibration_ts``)."""
    plt = plt_module()
    rows = [("calibration", "ece", "")]
    if any(r.get("calibration_ts") for r in results):
        rows.append(("calibration_ts", "ece_ts", "temperature-scaled: "))
    fig, axes = plt.subplots(len(rows), len(results), figsize=(4.2 * len(results), 4.2 * len(rows)), squeeze=False)
    for i, (key, ece_key, label) in enumerate(rows):
        for ax, r in zip(axes[i], results):
            cal = r.get(key)
            if not cal:
                ax.set_axis_off()
                ax.set_title(f"{r['name']}: no validation split for temperature scaling", fontsize=8)
                continue
            edges = np.array(cal["edges"])
            width = edges[1] - edges[0]
            centers = edges[:-1] + width / 2
            counts = np.array(cal["count"])
            acc = np.where(counts > 0, cal["accuracy"], 0)
            ax.bar(centers, acc, width=width * 0.95, color="#4C72B0", edgecolor="k", label="accuracy")
            gap_bottom = np.minimum(acc, centers)
            ax.bar(centers, np.abs(centers - acc) * (counts > 0), bottom=gap_bottom, width=width * 0.95,
                   color="#DD8452", alpha=0.5, label="gap to confidence")
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            for x, a, c in zip(centers, acc, counts):
                if c > 0:
                    ax.text(x, min(a, 0.93) + 0.02, str(c), ha="center", fontsize=6, rotation=90)
            t = f", T = {r['temperature']:.2f}" if key == "calibration_ts" else ""
            ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence", ylabel="accuracy")
            ax.set_title(f"{r['name']}\n{label}ECE = {100 * r[ece_key]:.2f}% ({cal['n_bins']} bins{t})", fontsize=9)
            ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)


def histogram_figure(results: Sequence[tuple[dict, dict]], score: str, path: Path) -> Path:
    """Score histograms, in-distribution vs each OOD set (rows) for each run (columns).

    ``results``: (metrics, hist) per run; hist: set → score → per-image scores, with "in" the in-distribution set."""
    plt = plt_module()
    sets = [k for k in results[0][1] if k != "in"]
    fig, axes = plt.subplots(max(1, len(sets)), len(results), figsize=(4.2 * len(results), 2.4 * max(1, len(sets))),
                             squeeze=False)
    for j, (r, hist) in enumerate(results):
        s_in = hist["in"][score]
        for i, name in enumerate(sets):
            ax = axes[i][j]
            s_out = hist[name][score]
            both = np.r_[s_in, s_out]
            lo, hi = np.percentile(both, [0.5, 99.5])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
            # one filled outline per histogram, not 50 bar patches: the same picture, drawn 10× faster
            ax.hist(np.clip(s_in, lo, hi), bins=bins, alpha=0.6, density=True, histtype="stepfilled",
                    label=f"in ({r['dataset']})")
            ax.hist(np.clip(s_out, lo, hi), bins=bins, alpha=0.6, density=True, histtype="stepfilled", label=name)
            auroc = r["ood"][name][score]["auroc"]
            ax.set_title(f"{r['name']}: {score} vs {name} (AUROC {auroc:.3f})", fontsize=8)
            ax.legend(fontsize=7)
            ax.tick_params(labelsize=7)
    return _save(fig, path, dpi=100)


def curve_figure(curves: dict, path: Path, xlabel: str, ylabel: str, title: str,
                 ylim: Optional[tuple[float, float]] = (0, 1.02), xscale: str = "linear",
                 hline: Optional[tuple[float, str]] = None) -> Path:
    """Line plot of {label: ([x...], [y...])} (robustness curves, FD along the chains); ``hline=(y, label)`` draws a
    dashed reference line (a target)."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="k", ls="--", lw=1, label=hline[1])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=ylim, xscale=xscale)
    if xscale == "symlog":  # counts from 0: linear below 1, logarithmic above, nothing left of 0
        ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def tradeoff_figure(groups: dict, path: Path, gap: float = -1.0, ratio: float = 0.5) -> Path:
    """Accuracy against samples: {label: [{"seed", "gap", "ratio", "mnist"}, ...]} as one colour per label, each seed
    a dot (a cross where MNIST was lost to the baseline's best detector), the targets ``gap`` (points) and ``ratio``
    (FD ÷ the starts') as dashed lines with the corner that meets both shaded."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (label, pts) in enumerate(groups.items()):
        colour = f"C{i % 10}"
        for lost in (False, True):
            sel = [p for p in pts if ("lost" in (p.get("mnist") or "")) == lost]
            if sel:
                ax.scatter([p["gap"] for p in sel], [p["ratio"] for p in sel], color=colour,
                           marker="x" if lost else "o", s=36, label=None if lost else label)
        for p in pts:
            ax.annotate(str(p["seed"]), (p["gap"], p["ratio"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points", color=colour)
    ax.axvline(gap, color="k", ls="--", lw=1)
    ax.axhline(ratio, color="k", ls="--", lw=1)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    x0, x1, y0, y1 = min(x0, gap - 0.1), max(x1, gap + 0.1), min(y0, ratio - 0.05), max(y1, ratio + 0.05)
    ax.fill_between([gap, x1], y0, ratio, color="g", alpha=0.08, label="both targets met")
    ax.set(xlim=(x0, x1), ylim=(y0, y1))
    ax.set(xlabel="JEM accuracy − its baseline's (points)", ylabel="fresh chains' FD ÷ their starts'",
           title="Accuracy against samples, each seed a point (× : MNIST lost)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def draws_figure(groups: dict, path: Path, line: float = 0.5,
                 what: str = "fresh chains' FD ÷ their starts'") -> Path:
    """The sample measure on independent draws: {label: {"ratios", "mean", "se", "where"}} as one row per label, each
    draw a dot, the mean ± two standard errors as a bar coloured by ``where`` ("under" / "over" the line), and the
    sample line ``line`` dashed; ``what`` names the ratio on the x axis."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.38 * len(groups)))
    for i, v in enumerate(groups.values()):
        colour = {"under": "C2", "over": "C3"}.get(v["where"], "C0")
        ax.scatter(v["ratios"], [-i] * len(v["ratios"]), s=12, alpha=0.5, color=colour)
        ax.errorbar(v["mean"], -i, xerr=0 if math.isnan(v["se"]) else 2 * v["se"], fmt="D", color=colour, ms=6,
                    capsize=4)  # one draw: no standard error
    ax.axvline(line, color="k", ls="--", lw=1)
    ax.set_yticks(-np.arange(len(groups)), list(groups))
    ax.set(xlabel=f"{what} (dots: draws; ◆: their mean ± 2 standard errors)",
           title="The sample line on independent draws\n(green: the mean under it by > 2 SE; red: over it; blue: within)")
    ax.set_ylim(-len(groups) + 0.5, 0.5)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def fd_infinity_figure(fits: dict, path: Path) -> Path:
    """FD∞ read off its fit: {set: ``metrics.frechet_distance_infinity``'s dict} as each set's FD of m images
    against 1/m (dots) and the fitted line down to 1/m = 0, where it meets FD∞ (◆): how much of each FD at the largest
    m is the estimator's bias."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(max(f["sizes"]) for f in fits.values())
    for i, (name, f) in enumerate(fits.items()):
        inv = 1.0 / np.asarray(f["sizes"], np.float64)
        ax.scatter(inv, f["fd"], s=10, color=f"C{i % 10}", alpha=0.6)
        xs = np.array([0.0, inv.max()])
        ax.plot(xs, f["fd_inf"] + f["slope"] * xs, color=f"C{i % 10}", lw=1,
                label=f"{name}: FD {np.asarray(f['fd'])[np.asarray(f['sizes']) == top].mean():.1f} at {top}, "
                      f"FD∞ {f['fd_inf']:.1f}")
        ax.plot(0, f["fd_inf"], "D", color=f"C{i % 10}", ms=6)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="1 / images per set", ylabel="Fréchet distance to test images",
           title="The FD of m images against 1/m, and FD∞ where the line meets 1/m = 0\n(Chong & Forsyth 2020)")
    ax.set_xlim(left=-0.02 * ax.get_xlim()[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def energy_parts_figure(panels: dict, path: Path, points: int = 600) -> Path:
    """log p(x)'s two parts, one panel per run: {title: {set: (confidence (N,), shift (N,))}} as a scatter of at most
    ``points`` images per set, the set "test" first, with the line shift + confidence = the test images' median log
    p(x) (dashed): a point above it is rated likelier than the median test image."""
    plt = plt_module()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for ax, (title, sets) in zip(axes[0], panels.items()):
        for i, (name, (conf, shift)) in enumerate(sets.items()):
            keep = torch.linspace(0, len(conf) - 1, min(points, len(conf))).long()
            ax.scatter(conf[keep].numpy(), shift[keep].numpy(), s=4, alpha=0.35, color=f"C{i % 10}", label=name)
        conf, shift = sets["test"]
        level = float((conf + shift).median())
        xs = np.array(ax.get_xlim())
        ax.plot(xs, level - xs, "k--", lw=1, label=f"test median log p(x) {level:.1f}")
        ax.set(xlabel="confidence: LogSumExp of the centred logits", ylabel="shift: the logits' mean",
               title=title if len(title) <= 48 else "…" + title[-47:])
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, markerscale=3)
    return _save(fig, path)


def distal_figure(rows: Sequence[tuple[str, dict]], title: str, path: Path) -> Path:
    """Distal adversarials: one row per run; ``rows``: (label, {"x", "confidence", "log_px", "data_log_px"})."""
    plt = plt_module()
    n = len(rows[0][1]["confidence"])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.5 * n, 1.9 * len(rows)), squeeze=False)
    for i, (label, d) in enumerate(rows):
        imgs = to_uint8(d["x"]).permute(0, 2, 3, 1).numpy()
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j].squeeze(-1) if imgs.shape[-1] == 1 else imgs[j], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"p={d['confidence'][j]:.2f}\nlogp={d['log_px'][j]:.1f}", fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        axes[i][0].set_ylabel(f"{label}\n(test data\nlogp {d['data_log_px']:.1f})", fontsize=7)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------------------
# replay-buffer grids written during training
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def samples_by_class(buffer: torch.Tensor, jem: JEM, num_classes: int, n_per_class: int, g: torch.Generator,
                     class_conditional: bool) -> torch.Tensor:
    """``n_per_class`` buffer images per class, one row per class: the buffer's class slices for a
    class-conditional buffer, else buffer samples grouped by the class the model predicts (most confident first;
    short rows padded with blank tiles)."""
    c = num_classes
    if class_conditional:
        per = len(buffer) // c
        return torch.cat([buffer[k * per : k * per + min(n_per_class, per)] for k in range(c)])
    pool = buffer[torch.randperm(len(buffer), generator=g)[: min(len(buffer), 2000)].to(buffer.device)]
    conf, pred = jem.logits(pool).softmax(1).max(1)
    rows = []
    for k in range(c):
        idx = torch.nonzero(pred == k).flatten()
        idx = idx[conf[idx].argsort(descending=True)][:n_per_class]
        row = pool[idx]
        if len(row) < n_per_class:
            row = torch.cat([row, torch.ones(n_per_class - len(row), *pool.shape[1:], device=pool.device)])
        rows.append(row)
    return torch.cat(rows)


@torch.no_grad()
def buffer_grids(buffer: torch.Tensor, jem: JEM, num_classes: int, class_conditional: bool, step: int,
                 out_dir: Path, latest: tuple[Path, Path], n_per_class: int = 10) -> None:
    """``out_dir/uncond_<step>.png`` (100 random chains) and ``out_dir/cond_<step>.png`` (one row per class), copied
    to the ``latest`` paths. Uses its own generator, so it never changes a training trajectory."""
    g = torch.Generator().manual_seed(step)
    pick = torch.randperm(len(buffer), generator=g)[:100].to(buffer.device)
    uncond = save_grid(buffer[pick], out_dir / f"uncond_{step:07d}.png", nrow=10)
    cond = save_grid(samples_by_class(buffer, jem, num_classes, n_per_class, g, class_conditional),
                     out_dir / f"cond_{step:07d}.png", nrow=n_per_class)
    copy_atomic(uncond, latest[0])
    copy_atomic(cond, latest[1])


def final_trajectory(records: Sequence[dict], kind: str) -> list[dict]:
    """Records of one kind along the trajectory the run kept: a rollback to step s discards what was logged after s."""
    kept: list[dict] = []
    for r in records:
        if r.get("kind") == "rollback":
            kept = [k for k in kept if k["step"] <= r["step"]]
        elif r.get("kind") == kind:
            kept.append(r)
    return kept


def training_curves(records: Sequence[dict], path: Path) -> Optional[Path]:
    """Training curves from metrics.jsonl records: loss terms, energies and gap, accuracy, lr, sampler gradient norm;
    rollbacks marked as red lines. None when there is nothing to draw yet."""
    rollbacks = [r for r in records if r.get("kind") == "rollback"]
    train, evals = final_trajectory(records, "train"), final_trajectory(records, "eval")
    if not train:
        return None
    plt = plt_module()
    panels = [("loss terms", ("loss", "l_clf", "l_px", "l_pxy")), ("energies", ("e_data", "e_samples", "energy_gap")),
              ("accuracy", ("train_acc",)), ("learning rate", ("lr",)), ("sampler ‖∇x log p(x)‖", ("sgld_grad_norm",)),
              ("sampler health", ("reach", "travel", "saturation"))]
    panels = [(t, [k for k in keys if any(k in r for r in train)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in train if k in r]
            ax.plot(*zip(*pts), lw=1, label=k)
        if title == "accuracy" and evals:
            ax.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", ms=3, label="val_accuracy")
        if title == "learning rate":
            ax.set_yscale("log")
        if title == "sampler health":  # health.py: an iteration is healthy when reach >= REACH_MIN
            from .health import REACH_MIN

            ax.axhline(REACH_MIN, color="g", ls="--", lw=0.8, label=f"healthy: reach ≥ {REACH_MIN}")
            ax.set_ylim(0, 1)
        for r in rollbacks:
            ax.axvline(r.get("diverged_at", r["step"]), color="r", lw=0.8, alpha=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    warnings = [r for r in records if r.get("kind") == "health" and r.get("status") in ("unhealthy", "overshoot")]
    title = [f"{len(rollbacks)} divergence(s) recovered (red lines)"] if rollbacks else []
    title += [f"health warnings at iterations {', '.join(str(r['step']) for r in warnings[:6])}"] if warnings else []
    if title:
        fig.suptitle("; ".join(title), fontsize=9, color="r" if warnings else "k")
    # fixed margins instead of tight_layout: the figure is redrawn during training and by every run of the test suite
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.88, wspace=0.35)
    return _save(fig, path, dpi=90, tight=False)
