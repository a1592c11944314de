"""How biased is the Fréchet distance of n images, and how much of that bias does FD∞ remove?

Training and test images of one dataset come from one distribution, so their FD in a classifier's features should be
about 0; measured on n images per set it is not (`jem eval`'s "real train (floor)" row). This script measures, in the
features of ``reference`` (a trained run, the classifier `jem eval --reference` would use): the FD of m training
images to m test images for each ``--sizes`` m (mean ± sd over ``--repeats`` random subsets) with m × FD (constant
where the bias is k/m), then for each ``--n`` the FD of n images beside FD∞ (``metrics.frechet_distance_infinity``:
the FD extrapolated to infinitely many images from subsets of n/2 to n, Chong & Forsyth 2020) over the same number of
draws. Reads only; prints markdown tables.

    python benchmarks/fd_floor.py runs/quality/fm-combo-s0/seed0/baseline --data-root ../shared/data
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from jemtorch.build import load_run
from jemtorch.evaluate import model_outputs, to_float
from jemtorch.metrics import frechet_distance, frechet_distance_infinity


def sizes_arg(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s]
    if not sizes or min(sizes) < 8:
        raise ValueError(f"sizes need at least one of at least 8 images, got {text!r}")
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", help="a trained run whose features the FD is measured in")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--sizes", default="100,200,300,500,700,1000,2000,4000", help="subset sizes m for the FD of m")
    ap.add_argument("--n", default="500,1000,2000,4000", help="set sizes n for FD against FD∞")
    ap.add_argument("--repeats", type=int, default=5, help="random subsets per size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        sizes, ns = sizes_arg(args.sizes), sizes_arg(args.n)
        if args.repeats < 1:
            raise ValueError("--repeats needs at least 1")
        ref = load_run(args.reference, "cpu", args.data_root)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    ref.jem.eval()
    data, g = ref.data, torch.Generator().manual_seed(args.seed)
    pool = min(2 * max(sizes + ns), len(data.x_train), len(data.x_test))  # subsets of the largest size differ
    train = model_outputs(ref.jem, to_float(data.x_train[torch.randperm(len(data.x_train), generator=g)[:pool]]),
                          grad=False).features.numpy()
    test = model_outputs(ref.jem, to_float(data.x_test[torch.randperm(len(data.x_test), generator=g)[:pool]]),
                         grad=False).features.numpy()
    rng = np.random.default_rng(args.seed)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        return train[rng.permutation(len(train))[:m]], test[rng.permutation(len(test))[:m]]

    print(f"{args.reference}: training against test images of {ref.cfg.dataset}, features of dimension "
          f"{train.shape[1]}, {args.repeats} random subsets per size of {pool} images of each\n")
    print("| m | FD of m (mean ± sd) | m × FD |\n|---|---|---|")
    for m in (m for m in sizes if m <= pool):
        fd = np.array([frechet_distance(*draw(m)) for _ in range(args.repeats)])
        print(f"| {m} | {fd.mean():.2f} ± {fd.std():.2f} | {m * fd.mean():.0f} |", flush=True)
    print("\n| n | FD of n (mean ± sd) | FD∞ from subsets of n/2 to n (mean ± sd) |\n|---|---|---|")
    for n in (n for n in ns if n <= pool):
        pairs = [draw(n) for _ in range(args.repeats)]
        fd = np.array([frechet_distance(a, b) for a, b in pairs])
        inf = np.array([frechet_distance_infinity(a, b, seed=k)["fd_inf"] for k, (a, b) in enumerate(pairs)])
        print(f"| {n} | {fd.mean():.2f} ± {fd.std():.2f} | {inf.mean():.2f} ± {inf.std():.2f} |", flush=True)


if __name__ == "__main__":
    main()
