"""The sample line on independent draws, in one figure: one row per run, each draw a dot, the mean ± 2 standard errors.

Reads the printed output of ``benchmarks/sample_draws.py`` kept in files (``LABEL=LOG``; a label given twice pools
its files' draws: one run measured in two parts), prints each label's mean ratio ± its standard error and draws
them against the sample line (``--line``, issue 24: fresh chains' FD ≤ 0.5× their starts'). Reads only, writes only
``--out``.

    python benchmarks/sample_draws.py RUN REF --draws 1,2,3,4 > logs/s0.log
    python benchmarks/draws_figure.py "seed 0=logs/s0.log" "seed 1=logs/s1.log" --out docs/fmnist_sample_draws.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fd_curves import labelled  # benchmarks/ is on sys.path when this script runs
from sample_draws import read_draws, verdict

from jemtorch.figures import draws_figure

READINGS = {  # --reading: (sample_draws.py's column, the figure's axis)
    "plain": ("ratio", "fresh chains' FD ÷ their starts'"),
    "above-floor": ("ratio above the floor", "(FD − floor) ÷ (starts' FD − floor)"),
    "fd-inf": ("ratio of FD∞", "fresh chains' FD∞ ÷ their starts' FD∞"),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="LABEL=LOG (sample_draws.py's printed output)")
    ap.add_argument("--out", type=Path, default=None, help="PNG to draw (none: the table only)")
    ap.add_argument("--line", type=float, default=0.5, help="the sample line (issue 24: ≤ 0.5× the starts' FD)")
    ap.add_argument("--reading", choices=list(READINGS), default="plain",
                    help="which ratio: the FDs' (plain), the FDs less the floor's (above-floor) or the FD∞s' (fd-inf)")
    args = ap.parse_args(argv)
    groups: dict[str, list[float]] = {}
    for spec in args.logs:
        label, log = labelled(spec, "LOG")
        try:
            groups.setdefault(label, []).extend(read_draws(log.read_text(), READINGS[args.reading][0]))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {log}: {e}") from None
    print("| run | draws | mean ratio ± standard error | the line |")
    print("|---|---|---|---|")
    found = {label: verdict(r, args.line) for label, r in groups.items()}
    for label, v in found.items():
        print(f"| {label} | {len(v['ratios'])} | {v['mean']:.3f} ± {v['se']:.3f} | {v['where']} |")
    if args.out is not None:
        draws_figure(found, args.out, line=args.line, what=READINGS[args.reading][1])
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
