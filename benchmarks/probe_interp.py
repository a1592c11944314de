"""How far can any score go on interpolations? Their AUROC split by whether the two blended test images share a class.

``jem eval``'s interpolations (``data.make_ood_set``) are 0.5·(x_i + x_j) of two different test images, so about one
pair in ten (Fashion-MNIST, CIFAR-10) blends two images of the same class — a blurred shirt from two shirts. This
scores ``--n`` test images and ``--n`` interpolations of them with the JEM's own scores and the baseline's post-hoc
detectors (each fitted on ``--n-fit`` images of its run's training split, ``detector_fit_images``, as ``jem eval``
fits them; nothing is stored) and prints AUROC over all
interpolations, over the same-class blends only and over the different-class blends only. The runs are not changed.

    python benchmarks/probe_interp.py runs/quality/fm-file-s0/seed0/jem runs/quality/fm-file-s0/seed0/baseline \
        --data-root DATA
"""
from __future__ import annotations

import argparse

import torch

from jemtorch.build import detector_fit_images, load_runs
from jemtorch.data import interpolation_pairs, to_float
from jemtorch.detectors import N_FIT, FittedDetectors
from jemtorch.evaluate import scored_test_indices
from jemtorch.metrics import ood_metrics

OWN = ("logp", "complexity", "ascent", "maxprob")
POSTHOC = ("vim", "knn", "mahalanobis", "logp", "maxlogit", "react")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jem")
    ap.add_argument("baseline")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--n", type=int, default=2000, help="test images, and interpolations of them")
    ap.add_argument("--n-fit", type=int, default=N_FIT, help="training images the detectors are fitted on")
    args = ap.parse_args()
    jem, base = load_runs([args.jem, args.baseline], device="cpu", data_root=args.data_root)
    k = scored_test_indices(jem, args.n, torch.Generator().manual_seed(0))  # jem eval's images and pairs (seed 0)
    x_in, y_in = to_float(jem.data.x_test[k]), jem.data.y_test[k]
    i, j = interpolation_pairs(len(x_in), len(x_in), torch.Generator().manual_seed(1))
    x_out, same = 0.5 * x_in[i] + 0.5 * x_in[j], (y_in[i] == y_in[j]).numpy()
    print(f"{len(x_in)} test images; {len(x_out)} interpolations, {same.sum()} of them of two images of one class\n")
    print("| run | score | all | same class | different classes |\n|---|---|---|---|---|")
    for run, names in ((jem, OWN), (base, POSTHOC)):
        x_fit, y_fit = detector_fit_images(run.cfg, run.data, args.n_fit)
        dets = FittedDetectors.fit(run.jem, to_float(x_fit), y_fit, names)
        s_in, s_out = dets.score(run.jem, x_in), dets.score(run.jem, x_out)
        for k in names:
            cells = [f"{ood_metrics(s_in[k], s_out[k][m])['auroc']:.3f}" if m.any() else "—"
                     for m in (same | ~same, same, ~same)]
            print(f"| {run.name} | {k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
