"""Where a trained run puts its density: mean ± sd of log p(x) = LogSumExp f(x) (up to the constant log Z) on its
validation images, on its replay buffer, and on synthetic inputs made like `jem eval`'s OOD sets — one line per run.

Why: an OOD AUROC says *that* log p(x) fails to tell two sets apart, not *where* the model put the mass. The buffer
column shows what the p(x) term has been pushing down (and ``buffer ±1`` how many of its pixels sit at the clip
bounds: chains that saturate teach the model about saturated noise only); ``±1 noise`` is uniform noise with every
pixel pushed to −1 or +1, the kind of image saturated chains produce. Scores above the data's mean are inputs the
model thinks likelier than its own training images. In brackets: the AUROC of log p(x) between the validation images
(positive) and that set — the validation split's counterpart of `jem eval`'s test-set AUROC. ``--batch-stats``
scores every set as the training loss saw p(x)'s images — BatchNorm normalising each batch by its own statistics —
which shows whether the density was learnt and only fails to carry over to the running averages evaluation uses.
``--levels K`` adds a table of flat images at K grey levels: where along the constant set the density lies.

    python benchmarks/probe_logp.py runs/quality/fm-v3/seed0/jem runs/quality/fm-v3/seed0/baseline --levels 11
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import jemtorch
from jemtorch.checkpoint import CheckpointError, load_safe
from jemtorch.data import make_ood_set, to_float
from jemtorch.metrics import ood_metrics
from jemtorch.sampler import frozen

SETS = ("uniform", "gaussian", "constant", "interp")


def log_px(model, x: torch.Tensor, batch_stats: int = 0) -> torch.Tensor:
    """LogSumExp f(x) as evaluation scores it (BatchNorm's running averages), or with ``batch_stats`` > 0 in batches
    of that many images normalised by their own statistics — as the training loss saw p(x)'s data and samples."""
    if not batch_stats:
        return torch.logsumexp(model.jem.logits(x, 500).float().cpu(), 1)
    with torch.no_grad(), frozen(model.jem, "train"):
        return torch.cat([torch.logsumexp(model.jem(c).float(), 1) for c in x.split(batch_stats)])


def probe(run: str, n: int = 1000, seed: int = 0, batch_stats: bool = False, levels: int = 0) -> dict:
    try:
        model = jemtorch.load(run, device="cpu")
        x = to_float(model.validation_split()[0][:n])
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    cfg = model.run_cfg
    try:
        buffer = load_safe(Path(run) / "checkpoint.pt")["buffer"]["data"][:n].float()
    except (CheckpointError, KeyError, OSError) as e:
        raise SystemExit(f"error: {run}: no replay buffer in checkpoint.pt ({e})") from None
    g = torch.Generator().manual_seed(seed)
    sets = {"data": x, "buffer": buffer,
            "±1 noise": torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)}
    sets.update({name: make_ood_set(name, x, len(x), seed) for name in SETS})
    out = {"run": run, "buffer_saturated": (buffer.abs() > 0.99).float().mean().item()}
    chunk = (cfg.px_batch_size if cfg.px_batch_size > 0 else cfg.batch_size) if batch_stats else 0
    scores = {name: log_px(model, z, chunk) for name, z in sets.items()}
    for name, v in scores.items():
        auroc = ood_metrics(scores["data"].numpy(), v.numpy())["auroc"] if name != "data" else float("nan")
        out[name] = (v.mean().item(), v.std().item(), auroc)
    if levels:  # flat images, one grey level each, as evaluated: where along the constant set the density lies
        c = torch.linspace(-1, 1, levels)
        flat = log_px(model, c.view(-1, *[1] * (x.dim() - 1)).expand(-1, *x.shape[1:]).contiguous())
        data = scores["data"] if not batch_stats else log_px(model, x)
        out["levels"] = [(a, b, (data < b).float().mean().item()) for a, b in zip(c.tolist(), flat.tolist())]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--n", type=int, default=1000, help="images per set")
    ap.add_argument("--batch-stats", action="store_true",
                    help="normalise each set by its own batch statistics, in batches of the run's p(x) batch size, as "
                         "the training loss did (a diagnosis, not an OOD score: it depends on the batch's company)")
    ap.add_argument("--levels", type=int, default=0, metavar="K",
                    help="also score flat images at K grey levels from −1 to 1, as evaluated (running averages): log "
                         "p(x) and, in brackets, the share of validation images the model rates less likely")
    args = ap.parse_args()
    if args.levels < 0:
        ap.error(f"--levels must be ≥ 0, got {args.levels}")
    cols = ["data", "buffer", "±1 noise", *SETS]
    print("| run | " + " | ".join(cols) + " | buffer pixels at ±1 |\n|---|" + "---|" * (len(cols) + 1))
    flat = []
    for run in args.runs:
        p = probe(run, args.n, batch_stats=args.batch_stats, levels=args.levels)
        cells = " | ".join(f"{p[c][0]:.2f} ± {p[c][1]:.2f}" + (f" ({p[c][2]:.3f})" if c != "data" else "")
                           for c in cols)
        print(f"| {run} | {cells} | {100 * p['buffer_saturated']:.0f}% |", flush=True)
        flat.append(p.get("levels"))
    if args.levels:
        print("\nflat images: log p(x) (share of validation images below it)\n\n| run | "
              + " | ".join(f"{round(c, 6) + 0.0:+.2f}" for c, _, _ in flat[0]) + " |\n|---|" + "---|" * args.levels)
        for run, row in zip(args.runs, flat):
            print(f"| {run} | " + " | ".join(f"{v:.2f} ({q:.2f})" for _, v, q in row) + " |")


if __name__ == "__main__":
    main()
