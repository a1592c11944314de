"""Is a run's fresh-chain ratio above or below the sample line, or only one draw's luck?

Issue 24's sample target: fresh class-conditional chains' Fréchet distance (in a reference classifier's features, to
test images) after the eval's chain length is at most half their starting points'. The quality benchmark measures it
once: one draw of chains and of test images (``--n-gen`` each, 1000 by default). That ratio moves 0.017–0.024× between
two draws on the same run (docs/results/density.md, "Half the step at sampling on the parity file"), the size of the
misses it was asked to judge. This script repeats the benchmark's own measure (``evaluate.generation``, the code `jem
eval` runs) on ``--draws`` independent draws — draw d: chains (and their starts) seeded d + 7, as `jem eval --seed d`
seeds them, and test images drawn by a generator seeded d — and prints each draw's starts' FD, the chains' FD and
their ratio, then the mean ratio ± its standard error (the draws' standard deviation / √draws). The runs are not
changed. Its printed output, kept in a file, is what ``benchmarks/draws_figure.py`` draws.

Each draw also prints its floor — the FD of as many training images to the same test images, which would be 0 for
the true distributions — and the ratio above it, (chains' FD − floor) ÷ (starts' FD − floor). An FD estimated from n
images per set is biased upward by about c/n (Chong & Forsyth, "Effectively Unbiased FID and Inception Score and
where to find them", CVPR 2020); on Fashion-MNIST at n = 1000 that bias is most of the chains' FD (floor 12–14
against chains 21–24), so the plain ratio depends on n (one run: 0.52× at n = 1000, 0.39× at n = 4000) where the
ratio above the floor does not (0.32× and 0.33×). ``--sample-steps 1`` is a cheap way to read the floors and starts of
draws already run: they do not depend on the chains. The floor is an approximation (the bias depends on both sets'
covariances, not on the test images' alone); each draw also prints FD∞, the FD extrapolated to infinitely many images
(the paper's estimator, ``metrics.frechet_distance_infinity``), and the ratio of the chains' FD∞ to the starts'.

    python benchmarks/sample_draws.py runs/quality/fm-combo-s0/seed0/jem runs/quality/fm-combo-s0/seed0/baseline \
        --data-root ../shared/data --draws 1,2,3,4 --sample-step-cap 0.01
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

from jemtorch.build import load_run
from jemtorch.evaluate import EvalOptions, check_sample_step_cap, generation, sampling_config
from jemtorch.figures import fd_infinity_figure

STARTS, FRESH = "chain starts (0 steps)", "fresh chains ({} steps)"
FLOOR = "real train (floor)"
HEADER = ("| draw | starts' FD | chains' FD | ratio | floor: training images' FD | ratio above the floor | "
          "starts' FD∞ | chains' FD∞ | ratio of FD∞ | floor's FD∞ | reference's accuracy on the chains | s |")


def verdict(ratios: list[float], line: float = 0.5) -> dict:
    """The draws' mean ratio, its standard error (nan for one draw) and where the mean lies against ``line``:
    "under" / "over" it by more than two standard errors, else "within 2 SE" ("one draw" for one)."""
    mean = statistics.fmean(ratios)
    if len(ratios) < 2:
        return {"ratios": ratios, "mean": mean, "se": float("nan"), "where": "one draw"}
    se = statistics.stdev(ratios) / math.sqrt(len(ratios))
    where = "under" if mean + 2 * se <= line else "over" if mean - 2 * se > line else "within 2 SE"
    return {"ratios": ratios, "mean": mean, "se": se, "where": where}


def read_draws(text: str, column: str = "ratio") -> list[float]:
    """One column (by its header's name: "ratio", "ratio above the floor") of every draw in this script's printed
    output ``text``: the rows under its table's header."""
    lines = text.splitlines()
    heads = [k for k, line in enumerate(lines) if line.startswith("| draw | starts' FD |")]
    if not heads:
        raise ValueError("no table of sample_draws.py in it")
    names = [c.strip() for c in lines[heads[0]].split("|")[1:-1]]
    if column not in names:
        raise ValueError(f"its table has no column {column!r} (an older output?)")
    k, rows = 1 + names.index(column), []
    for line in lines[heads[0] + 2:]:
        if not line.startswith("| "):
            break
        rows.append(float(line.split("|")[k]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a JEM run directory")
    ap.add_argument("reference", help="the classifier whose features the FD is measured in (its baseline)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--draws", default="1,2,3,4",
                    help="comma-separated draw seeds; one seed twice gives one draw twice (the benchmark's own draw "
                         "is none of them: `jem eval` draws other images from its generator first)")
    ap.add_argument("--n-gen", type=int, default=1000, help="chains and test images per draw (the benchmark's)")
    ap.add_argument("--sample-steps", type=int, default=200, help="chain steps (the benchmark's)")
    ap.add_argument("--sample-step-cap", type=float, default=None, metavar="RMS",
                    help="the chains' step cap (default: the run's, as `jem eval`)")
    ap.add_argument("--figure", type=Path, default=None, metavar="PNG",
                    help="draw the first draw's FD of m images against 1/m for the floor, the starts and the chains, "
                         "with the lines FD∞ is read from (figures.fd_infinity_figure)")
    args = ap.parse_args()
    try:
        draws = [int(d) for d in args.draws.split(",") if d]
        if not draws or args.n_gen < 8 or args.sample_steps < 1:
            raise ValueError("--draws needs at least one seed, --n-gen >= 8 (FD∞'s subsets) and --sample-steps >= 1")
        check_sample_step_cap(args.sample_step_cap)
        run, ref = load_run(args.run, "cpu", args.data_root), load_run(args.reference, "cpu", args.data_root)
        run = dataclasses.replace(run, cfg=sampling_config(run.cfg, args.sample_step_cap))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    run.jem.eval()
    fresh = FRESH.format(args.sample_steps)
    print(f"{args.run}: {args.n_gen} class-conditional fresh chains of {args.sample_steps} steps (cap "
          f"{run.cfg.sgld_step_cap}) and {args.n_gen} test images per draw, FD in {args.reference}'s features\n")
    print(HEADER)
    print("|---" * 12 + "|")
    ratios, ratios_inf = [], []
    for d in draws:
        t = time.perf_counter()
        opts = EvalOptions(seed=d, n_gen=args.n_gen, sample_steps=args.sample_steps, progress=False)
        m = generation(run, ref, opts, torch.Generator().manual_seed(d))
        fd0, fd, floor = m["fd_ref"][STARTS], m["fd_ref"][fresh], m["fd_ref"][FLOOR]
        inf0, inf, inf_floor = m["fd_inf"][STARTS], m["fd_inf"][fresh], m["fd_inf"][FLOOR]
        ratios.append(fd / fd0)
        ratios_inf.append(inf / inf0)
        if args.figure is not None and d == draws[0]:
            fd_infinity_figure({k: m["fd_inf_fit"][k] for k in (FLOOR, STARTS, fresh)}, args.figure)
        print(f"| {d} | {fd0:.1f} | {fd:.1f} | {fd / fd0:.3f} | {floor:.1f} | {(fd - floor) / (fd0 - floor):.3f} | "
              f"{inf0:.1f} | {inf:.1f} | {inf / inf0:.3f} | {inf_floor:.1f} | {m['ref_accuracy'][fresh]:.3f} | "
              f"{time.perf_counter() - t:.0f} |", flush=True)
    print()
    for name, rs in (("ratio", ratios), ("ratio of FD∞", ratios_inf)):
        v = verdict(rs)
        print(f"{name} over {len(rs)} draws: {v['mean']:.3f} ± {v['se']:.3f} (standard error); the sample line 0.5: "
              f"{v['where']}")


if __name__ == "__main__":
    main()
