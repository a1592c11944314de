"""How far fresh chains get from their starts, run by run: the Fréchet distance after each chain length ÷ the
starts' FD, read from each run's ``jem eval`` metrics (``generation.fd_by_chain_length``, written by ``jem eval
--reference`` and by the quality benchmark). Prints the ratios as a markdown table and draws them in one figure with
the issue's target line. Reads only; writes only ``--out``.

    python benchmarks/fd_curves.py recipe=runs/quality/fm-tail005-scratch/seed0/jem \\
        cd40=runs/quality/fm-cd40/seed0/jem --out docs/fmnist_fd_by_chain_length.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jemtorch.checkpoint import CheckpointError
from jemtorch.figures import curve_figure
from jemtorch.rundir import EVAL_DIR, RunDir


def labelled(spec: str, what: str = "RUN_DIR") -> tuple[str, Path]:
    """``LABEL=PATH`` → (label, path); a one-line SystemExit naming the expected form otherwise."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise SystemExit(f"error: {spec!r} is not LABEL={what}")
    return label, Path(path)


def ratios(run: Path) -> dict[int, float]:
    """{chain length: FD ÷ FD of the starts} of one evaluated run; a one-line SystemExit when it has none."""
    name = f"{EVAL_DIR}/metrics.json"
    try:
        metrics = RunDir(run).read_json(name)  # {} when the run was never evaluated
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    by_length = metrics.get("generation", {}).get("fd_by_chain_length")
    if not by_length or "0" not in by_length:
        raise SystemExit(f"error: {run / name} has no FD by chain length: evaluate the run with "
                         "`jem eval RUN --reference BASELINE` first")
    start = by_length["0"]["fd"]
    return {int(k): v["fd"] / start for k, v in sorted(by_length.items(), key=lambda kv: int(kv[0]))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (a run evaluated against a reference classifier)")
    ap.add_argument("--out", type=Path, default=None, help="PNG to draw (none: the table only)")
    ap.add_argument("--target", type=float, default=0.5, help="the dashed line (issue 24: ≤ 0.5× the starts)")
    args = ap.parse_args(argv)
    curves = {}
    for spec in args.runs:
        label, run = labelled(spec)
        curves[label] = ratios(run)
    lengths = sorted({k for c in curves.values() for k in c})
    print("| run | " + " | ".join(f"{k} steps" for k in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for label, c in curves.items():
        print(f"| {label} | " + " | ".join(f"{c[k]:.2f}" if k in c else "—" for k in lengths) + " |")
    if args.out is not None:
        # the starts (0 steps) sit at 1 by definition; steps on a symmetric-log axis (0 has no log)
        curve_figure({label: (list(c), list(c.values())) for label, c in curves.items()}, args.out,
                     "chain steps (symlog)", "FD to test images ÷ the starts' FD",
                     "Fresh class-conditional chains, on the way", ylim=None, xscale="symlog",
                     hline=(args.target, f"target ≤ {args.target:g}×"))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
