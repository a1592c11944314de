"""Trained quality-benchmark pairs: each JEM's test accuracy minus its baseline's, with the paired bootstrap interval.

For each ``LABEL=QUALITY_OUT`` and each ``QUALITY_OUT/seed<S>`` holding a ``jem`` and a ``baseline`` run, both models
classify the whole test set (best-validation weights, as ``jem eval``) and the difference of their accuracies gets the
95% percentile interval of 1000 paired bootstrap resamples of the test images (``metrics.bootstrap_accuracy``: the
resamples ``jem eval`` uses) and a verdict from the JEM's side: won or lost when the interval excludes 0, else tied.
The interval is the test set's sampling noise, not the spread between training seeds. For runs evaluated before
``jem eval`` wrote ``accuracy_vs_reference``; nothing is written.

    python benchmarks/accuracy_verdicts.py ssl100=runs/quality/fm-parity-ssl100-s0 --data-root DATA
"""
from __future__ import annotations

import argparse

from fd_curves import labelled

from jemtorch.build import load_runs
from jemtorch.data import to_float
from jemtorch.energy import in_batches
from jemtorch.metrics import bootstrap_accuracy, format_difference, paired_difference, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=QUALITY_OUT")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="the resamples' seed (jem eval's --seed)")
    args = ap.parse_args()
    pairs = []
    for label, root in (labelled(spec, "QUALITY_OUT") for spec in args.runs):
        found = [(label, p) for p in sorted(root.glob("seed*")) if (p / "jem").is_dir() and (p / "baseline").is_dir()]
        if not found:
            raise SystemExit(f"error: no seed<S>/jem and seed<S>/baseline runs in {root}")
        pairs += found
    print("| label | seed | JEM | baseline | JEM − baseline (points) [95%] | verdict |\n|---|---|---|---|---|---|")
    datasets: dict = {}
    for label, pair in pairs:
        try:
            runs = load_runs([pair / "jem", pair / "baseline"], "cpu", args.data_root, datasets)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        right = [in_batches(lambda xb, jem=r.jem: jem.logits(to_float(xb)).cpu(), r.data.x_test, 500, r.device)
                 .argmax(1) == r.data.y_test for r in runs]
        acc = [c.double().mean().item() for c in right]
        d = paired_difference(*(bootstrap_accuracy(c, args.n_boot, args.seed) for c in right), acc[0] - acc[1])
        print(f"| {label} | {pair.name.removeprefix('seed')} | {100 * acc[0]:.2f}% | {100 * acc[1]:.2f}% | "
              f"{format_difference(d)} | {verdict(d['ci'])} |")


if __name__ == "__main__":
    main()
