"""Trained quality-benchmark pairs scored again with today's detectors: quality.py's OOD table, runs read as trained.

For each ``LABEL=QUALITY_OUT`` and each ``QUALITY_OUT/seed<S>`` holding a ``jem`` and a ``baseline`` run, this runs
``quality.py --ood-only``'s evaluation (every detector fitted on each run's training split, never on test or OOD
images; the JEM's best own score against the baseline's best with the paired bootstrap verdict) without comparing
configurations or training anything, and prints the OOD table per label — for re-reading old runs after a detector
changed (``detectors.FIT_VERSION``). Nothing is written but each run's detector cache (``detectors.safetensors``,
refitted when the fit version changed) and ``--out`` when given.

    python benchmarks/ood_verdicts.py file=runs/quality/fm-silu16-file-s1 comb=runs/quality/fm-silu16-data2-leak05-s1 \
        --data-root DATA --out verdicts.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fd_curves import labelled
from quality import DEFAULT_OOD, ood_only, ood_row, tables

from jemtorch.checkpoint import replace_atomic
from jemtorch.data import ood_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=QUALITY_OUT")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--ood", default=None, help="OOD sets (default: the dataset's, as quality.py)")
    ap.add_argument("--n", type=int, default=2000, help="test images scored per OOD set")
    ap.add_argument("--out", default=None, help="a JSON file of every row")
    args = ap.parse_args()
    groups = [labelled(spec, "QUALITY_OUT") for spec in args.runs]
    found = {label: sorted(p for p in root.glob("seed*") if (p / "jem").is_dir() and (p / "baseline").is_dir())
             for label, root in groups}
    empty = [str(root) for (label, root) in groups if not found[label]]
    if empty:
        raise SystemExit(f"error: no seed<S>/jem and seed<S>/baseline runs in {empty[0]}")
    every = {}
    for label, root in groups:
        rows = []
        for seed_dir in found[label]:
            dataset = json.loads((seed_dir / "jem" / "config.json").read_text())["dataset"]
            ood = tuple((args.ood or DEFAULT_OOD.get(dataset, "interp,uniform,constant")).split(","))
            res = ood_only(seed_dir, ["jem", "baseline"], ood, args)
            seed = int(seed_dir.name.removeprefix("seed"))
            rows += [ood_row(seed, name, res["jem"], res["baseline"]) for name in ood_labels(ood).values()]
        lines = tables([], rows, [])
        start = next(i for i, line in enumerate(lines) if line.startswith("OOD ("))
        print(f"\n## {label} ({root})\n\n" + "\n".join(lines[start:]), flush=True)
        every[label] = rows
    if args.out:
        replace_atomic(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(every, indent=1)))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
