"""Quality benchmark: a JEM and its classifier baseline, trained the same way, compared on one table.

Both runs use the same resolved configuration (dataset preset and recipe, model, data, epochs, seed, optimiser,
schedule); the baseline only sets ``p_x_weight = 0`` (no samples are drawn). Each pair is then evaluated with
``jem eval``'s code: test accuracy, ECE before and after temperature scaling (fitted on the validation split) — the
JEM's raw ECE minus the baseline's with a 95% paired-bootstrap interval over the test images — and OOD AUROC for the
paper's three scores (log p(x), max p(y|x), −‖∂ log p(x)/∂x‖) on the sets given by ``--ood``.

    python benchmarks/quality.py --dataset fashion-mnist --data-root ../shared/data --seeds 0 1 2
    python benchmarks/quality.py --dataset fashion-mnist --data-root ../shared/data --labels-per-class 100
    python benchmarks/quality.py --dataset digits --ood interp,uniform,constant

Any ``jem train`` flag can follow ``--`` and applies to both runs, e.g. ``-- --epochs 5 --model cnn-32``. Runs land
in ``--out`` (default runs/quality/<dataset>[-ssl<k>]/seed<s>/{jem,baseline}); the table is printed as markdown and
written to ``--out/quality.md`` and ``quality.json``. A run already in ``--out`` is reused (evaluated, not trained
again) when it was trained with the same configuration; a baseline also when the two differ only in settings of the
generative terms, which a baseline never reads (``jemtorch.config.GENERATIVE_ONLY``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jemtorch.cli import build_parser
from jemtorch.config import resolve_config, training_differences
from jemtorch.data import load_dataset
from jemtorch.evaluate import SCORES, EvalOptions, evaluate_runs
from jemtorch.metrics import format_difference
from jemtorch.train import Trainer, TrainingDiverged

DEFAULT_OOD = {"fashion-mnist": "mnist,uniform,constant,interp", "mnist": "fashion-mnist,uniform,constant,interp",
               "cifar10": "interp,uniform,constant,svhn", "digits": "interp,uniform,constant"}


def train_flags(extra: list[str]) -> dict:
    """`jem train` flags (after --) parsed exactly as the CLI parses them."""
    args = build_parser().parse_args(["train", *extra])
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "overwrite") and v is not None}


def train_pair(flags: dict, out: Path, data) -> dict:
    """Train JEM and baseline with the same config; returns {kind: summary or {'failed': message}}."""
    res = {}
    for kind, over in (("jem", {}), ("baseline", {"p_x_weight": 0.0, "p_x_y_weight": 0.0})):
        cfg = resolve_config({**flags, **over, "out": str(out / kind)})
        run_dir = out / kind
        if (run_dir / "summary.json").is_file():  # already trained with this configuration: reuse
            saved, wanted = json.loads((run_dir / "config.json").read_text()), json.loads(json.dumps(cfg.to_dict()))
            diff = training_differences(saved, wanted)  # a baseline ignores the generative settings
            if diff:
                sys.exit(f"quality: {run_dir} was trained with another configuration ({', '.join(diff)}); "
                         f"choose another --out or remove it")
            res[kind] = json.loads((run_dir / "summary.json").read_text())
            continue
        t0 = time.perf_counter()
        try:
            res[kind] = Trainer(cfg, data).fit()
        except TrainingDiverged as e:
            res[kind] = {"failed": str(e)}
        print(f"[quality] {out.name} {kind}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--labels-per-class", type=int, default=-1, help="semi-supervised: labels kept per class")
    p.add_argument("--ood", default=None, help="OOD sets for jem eval (default depends on the dataset)")
    p.add_argument("--n", type=int, default=2000, help="test images scored per OOD set")
    p.add_argument("--out", default=None)
    args, rest = p.parse_known_args()
    extra = rest[1:] if rest[:1] == ["--"] else rest
    tag = args.dataset + (f"-ssl{args.labels_per_class}" if args.labels_per_class > 0 else "")
    out_root = Path(args.out or f"runs/quality/{tag}")
    flags = {**train_flags(extra), "dataset": args.dataset, "data_root": args.data_root,
             "labels_per_class": args.labels_per_class, "progress": False}
    ood = tuple((args.ood or DEFAULT_OOD.get(args.dataset, "interp,uniform,constant")).split(","))
    data = load_dataset(args.dataset, args.data_root)

    rows = []
    for seed in args.seeds:
        out = out_root / f"seed{seed}"
        summaries = train_pair({**flags, "seed": seed}, out, data)
        ok = [k for k in ("jem", "baseline") if "failed" not in summaries[k]]
        metrics = {}
        if ok:
            evals = evaluate_runs([str(out / k) for k in ok],
                                  EvalOptions(ood=ood, n=args.n, data_root=args.data_root, progress=False, n_gen=200,
                                              n_samples=100, sample_steps=100))
            metrics = dict(zip(ok, evals))
        for kind in ("jem", "baseline"):
            s, m = summaries[kind], metrics.get(kind)
            row = {"seed": seed, "run": kind, "failed": s.get("failed")}
            if m:
                row.update(test_accuracy=m["test_accuracy"], ece=m["ece"], ece_ts=m["ece_ts"],
                           temperature=m["temperature"], train_seconds=s["train_seconds"], rollbacks=s["rollbacks"],
                           recipe=s.get("recipe"), ece_vs_baseline=m.get("ece_vs_reference", {}).get("raw"),
                           auroc={o: {sc: m["ood"][o][sc]["auroc"] for sc in SCORES} for o in ood})
            rows.append(row)

    cfg = resolve_config({**flags, "seed": args.seeds[0]})
    head = (f"{args.dataset}, recipe {cfg.recipe}, model {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
            f"labels/class {'all' if args.labels_per_class < 0 else args.labels_per_class}, seeds {args.seeds}")
    cols = ["seed", "run", "test acc", "ECE", "ECE − baseline's [95%]", "ECE (TS)", "T", "train s", "rollbacks"]
    cols += [f"{o} {sc}" for o in ood for sc in SCORES]
    lines = [f"**{head}** — OOD: AUROC (in-distribution positive) of log p(x) / max p(y|x) / −‖∇ log p(x)‖", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.get("failed") or "test_accuracy" not in r:
            lines.append(f"| {r['seed']} | {r['run']} | FAILED: {r.get('failed')} |")
            continue
        vals = [r["seed"], r["run"], f"{100 * r['test_accuracy']:.2f}%", f"{100 * r['ece']:.2f}%",
                format_difference(r["ece_vs_baseline"]),
                f"{100 * r['ece_ts']:.2f}%" if r["ece_ts"] is not None else "—",
                f"{r['temperature']:.2f}" if r["temperature"] else "—", f"{r['train_seconds']:.0f}", r["rollbacks"]]
        vals += [f"{r['auroc'][o][sc]:.3f}" for o in ood for sc in SCORES]
        lines.append("| " + " | ".join(map(str, vals)) + " |")
    for kind in ("jem", "baseline"):
        good = [r for r in rows if r["run"] == kind and "test_accuracy" in r]
        if len(good) > 1:
            acc = np.array([r["test_accuracy"] for r in good])
            ece = np.array([r["ece"] for r in good])
            lines.append(f"| mean ± sd | {kind} | {100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f}% | "
                         f"{100 * ece.mean():.2f} ± {100 * ece.std(ddof=1):.2f}% |")
    write_table(out_root, "quality", head, lines, rows)
    return 0


def write_table(out: Path, name: str, head: str, lines: list[str], rows: list[dict]) -> None:
    """Print the markdown table; write it to out/<name>.md and the rows to out/<name>.json."""
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps({"header": head, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
