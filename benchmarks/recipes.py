"""Recipes side by side: each recipe's JEM and its classifier baseline, same data, model and seed, a time budget each.

Made for the GPU figures of the quality issue (CIFAR-10, wrn-28-10, the ``jempp`` and ``sadajem`` recipes): time per
epoch, and accuracy after the epochs the budget allows. Each JEM trains under ``--time-limit`` (it stops after the
last whole epoch that fits); each recipe's baseline — that recipe's configuration with p(x) off, so the same
optimiser (SADA-JEM's SAM included), weight decay, schedule, BatchNorm and augmentation — then trains for as many
epochs as its JEM began (run ``<recipe>-baseline``). The schedules are the recipes' step schedules (warm-up, then
decays at epoch 50 and later), so a run stopped early followed the very learning rates of a longer one. Validation
accuracy is logged after every epoch, so the table also compares every JEM with its baseline at the JEM's epoch
count.

    python benchmarks/recipes.py --dataset imagefolder --data-root data/cifar10 --model wrn-28-10 --device cuda \\
        --recipes jempp sadajem --time-limit 150 --eval -- --amp bf16 --channels-last
    python benchmarks/recipes.py --dataset digits --model cnn-8 --recipes jempp sadajem --time-limit 10   # a CPU smoke

Any ``jem train`` flag can follow ``--`` and applies to every run. Runs land in ``--out``/{<recipe>,<recipe>-baseline}; the
table is printed as markdown and written to ``--out``/recipes.md and recipes.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from quality import train_flags, write_table  # benchmarks/ is on sys.path when this script runs

from jemtorch.config import resolve_config
from jemtorch.data import load_dataset
from jemtorch.evaluate import EvalOptions, evaluate_runs
from jemtorch.figures import final_trajectory
from jemtorch.train import Trainer, TrainingDiverged


def val_curve(run_dir: Path) -> dict[int, float]:
    """Validation accuracy after each whole epoch, from metrics.jsonl, along the trajectory the run kept (what a
    rollback discarded is dropped)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {int(r["epoch"]): r["val_accuracy"] for r in final_trajectory(records, "eval")
            if float(r["epoch"]).is_integer()}


def fit(flags: dict, run_dir: Path, data) -> dict:
    cfg = resolve_config({**flags, "out": str(run_dir)})
    try:
        summary = Trainer(cfg, data).fit()
    except TrainingDiverged as e:
        return {"failed": str(e)}
    print(f"[recipes] {run_dir.name}: {summary['epochs']:.2f} epochs in {summary['train_seconds']:.0f} s, test "
          f"{100 * summary['test_accuracy']:.2f}%", file=sys.stderr, flush=True)
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--model", default=None, help="model for every run (default: the dataset preset's)")
    p.add_argument("--recipes", nargs="+", default=["jempp", "sadajem"])
    p.add_argument("--time-limit", type=float, required=True, help="training seconds per JEM run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval", action="store_true", help="also ECE and log p(x) AUROC (jem eval's code, 1000 images)")
    p.add_argument("--ood", default="interp,uniform,constant")
    p.add_argument("--out", default=None)
    args, rest = p.parse_known_args()
    extra = rest[1:] if rest[:1] == ["--"] else rest
    out = Path(args.out or f"runs/recipes/{args.dataset}")
    common = {**train_flags(extra), "dataset": args.dataset, "data_root": args.data_root, "seed": args.seed,
              "device": args.device, "progress": False}
    if args.model:
        common["model"] = args.model
    data = load_dataset(args.dataset, args.data_root)

    summaries, baseline_of = {}, {}
    for recipe in args.recipes:
        summaries[recipe] = fit({**common, "recipe": recipe, "time_limit": args.time_limit}, out / recipe, data)
    for recipe in args.recipes:  # each JEM against the same recipe without p(x): SAM, weight decay etc. stay equal
        done = summaries[recipe]
        epochs = max(1, math.ceil(done["epochs"])) if "failed" not in done else 1
        name = baseline_of[recipe] = f"{recipe}-baseline"
        summaries[name] = fit({**common, "recipe": recipe, "p_x_weight": 0.0, "p_x_y_weight": 0.0, "epochs": epochs},
                              out / name, data)

    metrics = {}
    ok = [k for k, s in summaries.items() if "failed" not in s]
    if args.eval and ok:
        opts = EvalOptions(ood=tuple(args.ood.split(",")), n=1000, progress=False, n_gen=200, n_samples=100,
                           sample_steps=50, data_root=args.data_root)
        metrics = dict(zip(ok, evaluate_runs([str(out / k) for k in ok], opts, device=args.device)))

    curves = {k: val_curve(out / k) for k in ok}
    cols = ["run", "recipe", "epochs", "s/epoch", "s/iteration", "val acc (epoch: %)", "its baseline's val acc, same epoch",
            "test acc", "rollbacks"]
    ood = args.ood.split(",")
    if metrics:
        cols += ["ECE", "ECE (TS)"] + [f"log p(x) AUROC {o}" for o in ood]
    cfg = resolve_config({**common, "recipe": args.recipes[0]})
    head = (f"{args.dataset} ({len(data.x_train)} train / {len(data.x_test)} test images), model {cfg.model}, seed "
            f"{args.seed}, JEM time limit {args.time_limit:g} s, device {next(iter(summaries.values())).get('device')}")
    lines = [f"**{head}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = []
    for name, s in summaries.items():
        if "failed" in s:
            lines.append(f"| {name} | FAILED: {s['failed']} |")
            rows.append({"run": name, "failed": s["failed"]})
            continue
        curve = curves[name]
        last = max(curve) if curve else None
        base = baseline_of.get(name)  # None: this row is a baseline
        row = {"run": name, "recipe": s["recipe"], "epochs": s["epochs"], "train_seconds": s["train_seconds"],
               "s_per_epoch": s["train_seconds"] / s["epochs"], "s_per_iteration": s["train_seconds"] / s["iterations"],
               "val_curve": curve, "test_accuracy": s["test_accuracy"], "rollbacks": s["rollbacks"], "baseline": base,
               "baseline_val_same_epoch": curves.get(base, {}).get(last) if base else None}
        vals = [name, s["recipe"], f"{s['epochs']:.2f}", f"{row['s_per_epoch']:.1f}", f"{row['s_per_iteration']:.3f}",
                ", ".join(f"{e}: {100 * a:.1f}" for e, a in sorted(curve.items())),
                f"{100 * row['baseline_val_same_epoch']:.1f}% (epoch {last})" if row["baseline_val_same_epoch"]
                is not None else "—", f"{100 * s['test_accuracy']:.2f}%", s["rollbacks"]]
        if metrics:
            m = metrics[name]
            row.update(ece=m["ece"], ece_ts=m["ece_ts"], auroc_logp={o: m["ood"][o]["logp"]["auroc"] for o in ood})
            vals += [f"{100 * m['ece']:.2f}%", f"{100 * m['ece_ts']:.2f}%" if m["ece_ts"] is not None else "—"]
            vals += [f"{row['auroc_logp'][o]:.3f}" for o in ood]
        lines.append("| " + " | ".join(map(str, vals)) + " |")
        rows.append(row)
    write_table(out, "recipes", head, lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
