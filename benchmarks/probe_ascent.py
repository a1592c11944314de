"""Which statistics of a JEM's energy tell its data from OOD images? The exploration behind the ``ascent`` detector.

For a trained run, each image of its test split (``--n``) and of each OOD set gets log p(x), log ‖∇ₓ log p(x)‖, its
PNG bits/dim and the log rise of log p(x) along one chain of capped ascent steps (``detectors.ascent_path``), read
after each of ``--lengths`` steps. Each combination of these columns is scored as the ``typicality`` detectors are:
a kernel density fitted on ``--n-fit`` images of the run's training split (``detector_fit_images``), never on test or
OOD images. Prints AUROC (FPR at 95% TPR) per combination and OOD set. The run is not changed.

    python benchmarks/probe_ascent.py runs/quality/fm-density/seed0/jem --data-root DATA --lengths 1,3,5,10,20
"""
from __future__ import annotations

import argparse

import torch

from jemtorch.build import detector_fit_images, load_run
from jemtorch.data import make_ood_set, to_float
from jemtorch.detectors import ASCENT_CAP, Typicality, ascent_path, model_outputs, png_bits
from jemtorch.evaluate import scored_test_images
from jemtorch.metrics import ood_metrics
from jemtorch.sampler import frozen


class Columns(Typicality):
    """``typicality``'s kernel density over chosen columns of a statistics matrix; ``centres`` kernel centres (a
    seeded subset of the fit rows, as the detectors keep) and Scott's bandwidth times ``scale``."""

    def __init__(self, cols: list[int], centres: int = Typicality.MAX_POINTS, scale: float = 1.0):
        self.cols, self.MAX_POINTS, self.scale = cols, centres, scale

    def fit(self, out, y, head):
        super().fit(out, y, head)
        self.bandwidth = self.bandwidth * self.scale

    def pairs(self, m: torch.Tensor) -> torch.Tensor:
        return m[:, self.cols]


def statistics(jem, x: torch.Tensor, lengths: list[int], cap: float, batch: int = 500) -> torch.Tensor:
    """(N, 6 + len(lengths)): log p(x), log ‖∇ₓ log p(x)‖, PNG bits/dim, the logit margin f(x)[ŷ] − f(x)[second]
    (how sure the classifier is: a blend of two garments sits between their classes), log p(x)'s two parts — the
    logits' mean (the shift the softmax ignores) and LogSumExp of the centred logits (the classifier's confidence),
    log p(x) = shift + confidence — and the log rise after each length."""
    out = model_outputs(jem, x, batch, grad=True)
    with frozen(jem):
        rises = torch.cat([ascent_path(jem, x[i : i + batch], lengths, cap) for i in range(0, len(x), batch)])
    f = out.logits.double()
    top2, shift = f.topk(2, 1).values, f.mean(1)
    return torch.cat([torch.stack([f.logsumexp(1), (-out.gradnorm.double()).log(), png_bits(x), top2[:, 0] - top2[:, 1],
                                   shift, (f - shift[:, None]).logsumexp(1)], 1), rises.clamp(min=1e-6).log()], 1)


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments ``gather`` reads: the run, its data root, the OOD sets and how many images of each split."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--ood", default="mnist,interp,constant,uniform")
    ap.add_argument("--n", type=int, default=2000, help="test images (and images per OOD set)")
    ap.add_argument("--n-fit", type=int, default=4000, help="training images the densities are fitted on")
    return ap


def gather(run, args, statistics, fit: bool = True) -> dict[str, torch.Tensor]:
    """``statistics(jem, x, key)`` of ``--n-fit`` training images ("fit"; left out when ``fit`` is False: a probe
    that fits nothing), ``--n`` test images ("in", jem eval's) and ``--n`` images of each ``--ood`` set: the matrices
    the combinations are scored on."""
    stats = {}
    if fit:
        x_fit, _ = detector_fit_images(run.cfg, run.data, args.n_fit)
        stats["fit"] = statistics(run.jem, to_float(x_fit), 1)
    x_in = scored_test_images(run, args.n, torch.Generator().manual_seed(0))
    root = args.data_root or run.cfg.data_root
    stats["in"] = statistics(run.jem, x_in, 2)
    for k, name in enumerate(args.ood.split(",")):
        x = make_ood_set(name, x_in, args.n, seed=1, data_root=root, in_dataset=run.cfg.dataset)
        stats[name] = statistics(run.jem, x, 3 + k)
    return stats


def print_table(run, stats: dict[str, torch.Tensor], combos: dict, centres: int = Typicality.MAX_POINTS,
                scales: tuple[float, ...] = (1.0,)) -> None:
    """One row per combination: a tuple (column, sign) scores that column alone, signed so that higher =
    in-distribution; a list of columns is scored by a kernel density fitted on the "fit" rows (``centres`` kernel
    centres), one row per bandwidth scale (labelled "h×s" unless it is 1)."""
    sets = [n for n in stats if n not in ("fit", "in")]
    print(f"| {run.name}: AUROC (FPR95) | " + " | ".join(sets) + " |\n|---|" + "---|" * len(sets))
    for label, cols in combos.items():
        for scale in ((None,) if isinstance(cols, tuple) else scales):
            if scale is None:
                score = (lambda m, c=cols: c[1] * m[:, c[0]].numpy())
            else:
                det = Columns(cols, centres, scale)
                det.fit(stats["fit"], None, None)
                score = det.score
            s_in = score(stats["in"])
            cells = [ood_metrics(s_in, score(stats[n])) for n in sets]
            name = label if scale in (None, 1.0) else f"{label} h×{scale:g}"
            print(f"| {name} | " + " | ".join(f"{r['auroc']:.4f} ({r['fpr95']:.3f})" for r in cells) + " |",
                  flush=True)


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--lengths", default="1,3,5,10,20", help="chain lengths the rise is read after")
    ap.add_argument("--cap", type=float, default=ASCENT_CAP, help="RMS move per pixel and step")
    ap.add_argument("--centres", type=int, default=Typicality.MAX_POINTS, help="kernel centres kept of the fit rows")
    ap.add_argument("--bandwidths", default="1", help="multiples of Scott's bandwidth, one row each")
    args = ap.parse_args()
    lengths = [int(k) for k in args.lengths.split(",")]
    run = load_run(args.run, data_root=args.data_root)
    stats = gather(run, args, lambda jem, x, _: statistics(jem, x, lengths, args.cap))
    combos = {"log p": (0, 1), "(log p, PNG)": [0, 2], "complexity: (log p, ‖∇‖, PNG)": [0, 1, 2],
              "margin alone": (3, 1), "(log p, margin)": [0, 3], "(log p, PNG, margin)": [0, 2, 3],
              "(shift, confidence)": [4, 5], "(shift, confidence, PNG)": [4, 5, 2]}
    for j, k in enumerate(lengths):
        r = 6 + j
        combos.update({f"−rise{k} alone": (r, -1), f"(log p, rise{k})": [0, r], f"(log p, PNG, rise{k})": [0, 2, r],
                       f"(log p, ‖∇‖, PNG, rise{k})": [0, 1, 2, r], f"(log p, PNG, rise{k}, margin)": [0, 2, r, 3],
                       f"(shift, confidence, PNG, rise{k})": [4, 5, 2, r]})
    print_table(run, stats, combos, args.centres, tuple(float(b) for b in args.bandwidths.split(",")))


if __name__ == "__main__":
    main()
