"""The trade every density lever makes, in one figure: accuracy against the samples, one point per run and seed.

Reads the ``quality.json`` that ``benchmarks/quality.py`` writes into each ``--out`` and places every seed of every
labelled run at (the JEM's test accuracy − its baseline's, in points; fresh chains' FD after the eval's chain length ÷
their starts' FD), the two Fashion-MNIST targets of issue 24 as dashed lines (within 1 point; ≤ 0.5×), so the corner
where both are met is the lower right. A point drawn as a cross lost MNIST (AUROC or FPR95) to the best post-hoc
detector on its baseline. A label given twice pools its runs (one lever measured on several seeds in several
``--out``). Prints the points as a markdown table; reads only, writes only ``--out``.

    python benchmarks/tradeoff.py file=runs/quality/fm-silu16-pause0-s0 file=runs/quality/fm-silu16-file-s1 \\
        combination=runs/quality/fm-silu16-data2-leak05-s0 --out docs/fmnist_tradeoff.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fd_curves import labelled  # benchmarks/ is on sys.path when this script runs

from jemtorch.figures import tradeoff_figure


def points(out: Path) -> list[dict]:
    """One dict per seed of a quality benchmark's ``--out``: seed, accuracy − baseline (points), chains ratio, MNIST
    verdict (None without an MNIST row); a one-line SystemExit when the directory holds no finished benchmark."""
    path = out / "quality.json"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {path}: no finished quality benchmark here ({e.__class__.__name__})") from None
    accuracy = {(r["seed"], r["run"]): r["test_accuracy"] for r in rows["runs"] if not r.get("failed")}
    found = []
    for s in rows.get("samples", []):
        seed, by_length = s["seed"], s.get("by_length") or {}
        if "0" not in by_length or (seed, "jem") not in accuracy or (seed, "baseline") not in accuracy:
            continue
        longest = max(by_length, key=int)
        mnist = [o["verdict"] for o in rows.get("ood", []) if o["seed"] == seed and o["set"] == "mnist"]
        found.append({"seed": seed,
                      "gap": 100 * (accuracy[seed, "jem"] - accuracy[seed, "baseline"]),
                      "ratio": by_length[longest]["fd"] / by_length["0"]["fd"], "steps": int(longest),
                      "mnist": mnist[0] if mnist else None})
    if not found:
        raise SystemExit(f"error: {path}: no seed with a JEM, its baseline and FD by chain length")
    return found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=QUALITY_OUT (a benchmarks/quality.py --out directory)")
    ap.add_argument("--out", type=Path, default=None, help="PNG to draw (none: the table only)")
    ap.add_argument("--gap", type=float, default=-1.0, help="accuracy line, points (issue 24: within 1 point)")
    ap.add_argument("--ratio", type=float, default=0.5, help="samples line (issue 24: ≤ 0.5× the starts' FD)")
    args = ap.parse_args(argv)
    groups: dict[str, list[dict]] = {}
    for spec in args.runs:
        label, out = labelled(spec, "QUALITY_OUT")
        groups.setdefault(label, []).extend(points(out))
    print("| run | seed | accuracy − baseline | chains ÷ starts | MNIST | both lines met |")
    print("|---|---|---|---|---|---|")
    for label, pts in groups.items():
        for p in sorted(pts, key=lambda p: p["seed"]):
            met = p["gap"] >= args.gap and p["ratio"] <= args.ratio
            print(f"| {label} | {p['seed']} | {p['gap']:+.2f} | {p['ratio']:.3f} ({p['steps']} steps) | "
                  f"{p['mnist'] or '—'} | {'yes' if met else 'no'} |")
    if args.out is not None:
        tradeoff_figure(groups, args.out, gap=args.gap, ratio=args.ratio)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
