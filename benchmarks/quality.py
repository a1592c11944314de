"""Quality benchmark: a JEM and its classifier baseline, trained the same way, compared on three tables.

Both runs use the same resolved configuration (dataset preset and recipe, model, data, epochs, seed, optimiser,
schedule); the baseline only sets ``p_x_weight = 0`` (no samples are drawn). Each pair is evaluated with ``jem eval``'s
code (both runs together, the baseline as the reference classifier):

1. classification: test accuracy, ECE before and after temperature scaling (the JEM's raw ECE minus the baseline's
   with a 95% paired-bootstrap interval over the test images), the median first-order L2 distance to the decision
   boundary (``attacks.steepness``: large for a smooth model), training time, rollbacks, the JEM's healthy share;
2. OOD, per set: the JEM's log p(x), its best own score (``detectors.OWN``: log p(x), max p(y|x), −‖∇ log p(x)‖,
   typicality, complexity, ascent), the best post-hoc detector on the baseline and on the JEM (MaxLogit, Mahalanobis, ViM,
   KNN, ReAct, and the model-free PNG length; the baseline's own scores count as post-hoc: its log p(x) is the Energy
   score), AUROC and FPR at 95% TPR, the JEM's own minus the best post-hoc, and the verdict of the JEM's own against
   the baseline's best (won / lost / tied: whether the paired bootstrap interval over the scored images excludes 0,
   ``evaluate.versus_posthoc``);
3. samples: the Fréchet distance to test images in the baseline's features and the baseline's accuracy on
   class-conditional samples, for the chains' starting points, fresh chains and the replay buffer.

    python benchmarks/quality.py --dataset fashion-mnist --data-root ../shared/data --seeds 0 1 2
    python benchmarks/quality.py --dataset fashion-mnist --data-root ../shared/data --labels-per-class 100
    python benchmarks/quality.py --dataset digits --ood interp,uniform,constant
    python benchmarks/quality.py --dataset fashion-mnist --seeds 0 1 2 --ood-only   # trained runs: the OOD table alone

Any ``jem train`` flag can follow ``--`` and applies to both runs, e.g. ``-- --epochs 5 --model cnn-32``. Runs land
in ``--out`` (default runs/quality/<dataset>[-ssl<k>]/seed<s>/{jem,baseline}); the tables are printed as markdown and
written to ``--out/quality.md`` and ``quality.json`` (``--ood-only``: ``quality-ood.*``, the full tables kept). A
run already in ``--out`` is reused (evaluated, not trained again) when it was trained with the same configuration; a
baseline also when the two differ only in settings of the generative terms, which a baseline never reads
(``jemtorch.config.GENERATIVE_ONLY``). ``--baseline-runs ROOT`` compares with the classifiers already trained in
ROOT/seed<s>/baseline instead (copied in): a JEM on one network against the best classifier on another.
``--branch-from ROOT --from-epoch E`` trains each JEM as a branch of ROOT/seed<s>/jem after epoch E (kept there by
``--keep-epochs E``; ``jem train --from-epoch``): tails that share a density phase cost only their own epochs.
``--baseline-pseudo-label W`` (semi-supervised) gives the baseline alone a Pseudo-Label term (``jem train
--pseudo-label-weight``): the JEM's use of the unlabelled images against a classifier's; ``--baseline-vat W`` the
same with virtual adversarial training (``jem train --vat-weight``).

    python benchmarks/quality.py --seeds 4 --out runs/quality/A -- --config FILE --keep-epochs 8
    python benchmarks/quality.py --seeds 4 --out runs/quality/B --baseline-runs runs/quality/A \
        --branch-from runs/quality/A --from-epoch 8 -- --config FILE --keep-epochs 8 --px-tail-scale 0.1
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from jemtorch.build import load_run
from jemtorch.cli import build_parser, resolve_args
from jemtorch.cli import main as cli_main
from jemtorch.config import load_config_file, resolve_config, training_differences
from jemtorch.data import check_ood_name, load_dataset, ood_labels
from jemtorch.detectors import OWN
from jemtorch.evaluate import (
    EvalOptions,
    EvalResult,
    check_sample_step_cap,
    evaluate_runs,
    ood_detection,
    scored_test_images,
    versus_posthoc,
)
from jemtorch.metrics import format_difference
from jemtorch.rundir import METRICS, MetricsLog
from jemtorch.train import Trainer, TrainingDiverged

# (KMNIST and CIFAR-100 are not on the development machine: add them with --ood kmnist or --ood PATH/cifar100/test)
DEFAULT_OOD = {"fashion-mnist": "mnist,uniform,constant,interp", "mnist": "fashion-mnist,uniform,constant,interp",
               "cifar10": "interp,uniform,constant", "digits": "interp,uniform,constant"}


def train_flags(extra: list[str]) -> dict:
    """`jem train` flags (after --) parsed exactly as the CLI parses them; a ``--config`` file's entries come in
    under the explicit flags, as `jem train` layers them (jemtorch.config.config_layers)."""
    args = build_parser().parse_args(["train", *extra])
    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "config", "resume", "overwrite", "trust_code") and v is not None}
    return {**(load_config_file(args.config) if args.config else {}), **given}


def train_pair(flags: dict, out: Path, data, baseline: Optional[Path] = None, branch: Optional[tuple] = None,
               baseline_flags: Optional[dict] = None) -> dict:
    """Train JEM and baseline with the same config; returns {kind: summary or {'failed': message}}. ``baseline``: a
    trained classifier to compare with instead (copied into ``out``; same dataset and seed, any network). ``branch``:
    (a JEM run, an epoch it kept, the `jem train` flags): the JEM is trained as its branch (``jem train --from-epoch``).
    ``baseline_flags``: settings of the baseline alone (its Pseudo-Label term, say)."""
    res = {}
    if baseline is not None:
        res["baseline"] = adopt_baseline(baseline, out / "baseline", flags)
    for kind, over in (("jem", {}), ("baseline", {"p_x_weight": 0.0, "p_x_y_weight": 0.0, **(baseline_flags or {})})):
        if kind in res:
            continue
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
        if kind == "jem" and branch is not None:
            res[kind] = train_branch(cfg, *branch)
        else:
            try:
                res[kind] = Trainer(cfg, data).fit()
            except TrainingDiverged as e:
                res[kind] = {"failed": str(e)}
        print(f"[quality] {out.name} {kind}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return res


def train_branch(cfg, source: Path, epoch: int, extra: list[str]) -> dict:
    """Train the JEM ``cfg`` describes as a branch of the run ``source`` after ``epoch``, by `jem train` itself. The
    branch keeps the source's values where the flags are silent, so before anything is trained its configuration
    must be ``cfg``'s (say, a source trained with --px-fade-epochs 3 needs --px-fade-epochs 0 for a step)."""
    argv = ["train", "--resume", str(source), "--from-epoch", str(epoch), "--out", str(cfg.run_dir),
            "--dataset", cfg.dataset, "--data-root", cfg.data_root, "--seed", str(cfg.seed),
            "--labels-per-class", str(cfg.labels_per_class), "--no-progress", *extra]
    try:
        branched = resolve_args(build_parser().parse_args(argv))[0]
    except (ValueError, OSError) as e:
        sys.exit(f"quality: --branch-from: {e}")
    diff = training_differences(json.loads(json.dumps(branched.to_dict())), json.loads(json.dumps(cfg.to_dict())))
    if diff:
        sys.exit(f"quality: --branch-from: a branch of {source} would differ from the benchmark's JEM in "
                 f"{', '.join(diff)} (the source's values stay where no flag sets them); nothing was trained")
    rc = cli_main(argv)
    if rc != 0:
        sys.exit(f"quality: --branch-from: jem train could not branch {source} after epoch {epoch} (exit {rc})")
    return json.loads((Path(cfg.run_dir) / "summary.json").read_text())


def adopt_baseline(src: Path, dst: Path, flags: dict) -> dict:
    """Copy a trained classifier (p(x) off, the benchmark's dataset and seed) to ``dst``; returns its summary."""
    if not (src / "summary.json").is_file():
        sys.exit(f"quality: --baseline-runs: {src} is not a trained run (no summary.json)")
    saved = json.loads((src / "config.json").read_text())
    for key in ("dataset", "seed"):
        if saved.get(key) != flags[key]:
            sys.exit(f"quality: --baseline-runs: {src} has {key} {saved.get(key)!r}, the benchmark {flags[key]!r}")
    if saved.get("p_x_weight") or saved.get("p_x_y_weight"):
        sys.exit(f"quality: --baseline-runs: {src} is a JEM (p_x_weight {saved.get('p_x_weight')}), not a classifier")
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval", "detectors.safetensors"))
    elif json.loads((dst / "config.json").read_text()) != saved:  # never compare with another classifier than named
        sys.exit(f"quality: --baseline-runs: {dst} holds another classifier than {src}; choose another --out")
    return json.loads((dst / "summary.json").read_text())


def last_epoch_train_accuracy(run_dir: Path):
    """The mean accuracy on the training batches logged over the run's last epoch (None without a log). Behind the
    baseline here as much as on the test set: the JEM underfits (the density takes capacity); only on the test set:
    it generalises worse."""
    rows = [r for r in MetricsLog(run_dir / METRICS).records() if r.get("kind") == "train" and "train_acc" in r]
    if not rows:
        return None
    last = rows[-1]["epoch"]
    return float(np.mean([r["train_acc"] for r in rows if r["epoch"] > last - 1]))


def best(res: dict, names) -> tuple[str, dict]:
    """The detector of ``names`` with the highest AUROC on one OOD set's results."""
    k = max(names, key=lambda n: res[n]["auroc"])
    return k, res[k]


def ood_row(seed: int, label: str, jem: dict, base: dict) -> dict:
    """One OOD set of one seed: the JEM's own best against the post-hoc detectors of both models."""
    rj, rb = jem["ood"][label], base["ood"][label]
    own, own_r = best(rj, [n for n in jem["detectors"]["names"] if n in OWN])
    bk, br = best(rb, base["detectors"]["names"])
    jk, jr = best(rj, [n for n in jem["detectors"]["names"] if n not in OWN])
    top = br if br["auroc"] >= jr["auroc"] else jr
    row = {"seed": seed, "set": label, "jem_logp": rj["logp"]["auroc"], "own": own, "own_auroc": own_r["auroc"],
           "own_fpr95": own_r["fpr95"], "base_best": bk, "base_auroc": br["auroc"], "base_fpr95": br["fpr95"],
           "jem_posthoc": jk, "jem_posthoc_auroc": jr["auroc"], "jem_posthoc_fpr95": jr["fpr95"],
           "own_minus_best": own_r["auroc"] - top["auroc"], "own_minus_best_fpr95": own_r["fpr95"] - top["fpr95"]}
    v = next((v for v in jem.get("versus_baseline", []) if v["set"] == label), None)
    if v is not None:  # jem eval's comparison with the baseline's best, with its paired intervals and verdicts
        row.update(own_minus_base=v["auroc_diff"], own_minus_base_fpr95=v["fpr95_diff"], auroc_ci=v["auroc_diff_ci"],
                   fpr95_ci=v["fpr95_diff_ci"], verdict=f"{v['auroc_verdict']} / {v['fpr95_verdict']}")
    return row


def ood_only(out: Path, kinds: list[str], ood: tuple, args) -> dict:
    """Each run's OOD results alone (``jem eval``'s ood_detection: no calibration, no samples)."""
    opts = EvalOptions(ood=ood, n=args.n, data_root=args.data_root, progress=False)
    res, hist = {}, {}
    for kind in kinds:
        run = load_run(out / kind, data_root=args.data_root)
        x_in = scored_test_images(run, opts.n, torch.Generator().manual_seed(opts.seed))  # evaluate_run's images
        found, hist[kind] = ood_detection(run, opts, x_in)
        res[kind] = {"name": run.name, **found}
    if "jem" in res and "baseline" in res:  # as jem eval compares them: paired intervals from the per-image scores
        res["jem"]["versus_baseline"] = versus_posthoc(EvalResult(res["jem"], hist["jem"]),
                                                       [EvalResult(res["baseline"], hist["baseline"])],
                                                       opts.n_boot, opts.seed, own_posthoc=False)
    return res


def aurocs(ood: dict) -> dict:
    """{OOD set: {detector: AUROC}} of one run's OOD results."""
    return {o: {k: v["auroc"] for k, v in r.items() if isinstance(v, dict)} for o, r in ood.items()}


def evaluate_pair(seed: int, out: Path, summaries: dict, ood: tuple, args) -> tuple[list, list, list]:
    ok = [k for k in ("jem", "baseline") if "failed" not in summaries[k]]
    metrics = {}
    if ok and args.ood_only:
        metrics = ood_only(out, ok, ood, args)
    elif ok:
        evals = evaluate_runs([str(out / k) for k in ok],
                              EvalOptions(ood=ood, n=args.n, data_root=args.data_root, progress=False, n_gen=args.n_gen,
                                          n_samples=100, sample_steps=args.sample_steps,
                                          sample_step_cap=args.sample_step_cap))
        metrics = dict(zip(ok, evals))
    runs, oods, gens = [], [], []
    for kind in ("jem", "baseline"):
        s, m = summaries[kind], metrics.get(kind)
        health = s.get("health", {})
        row = {"seed": seed, "run": kind, "failed": s.get("failed"), "healthy": health.get("healthy_fraction"),
               "overshoot": health.get("overshoot_fraction"), "train_accuracy": last_epoch_train_accuracy(out / kind)}
        if m and args.ood_only:
            row.update(test_accuracy=s["test_accuracy"], train_seconds=s["train_seconds"], rollbacks=s["rollbacks"],
                       auroc=aurocs(m["ood"]))
        elif m:
            row.update(test_accuracy=m["test_accuracy"], ece=m["ece"], ece_ts=m["ece_ts"], temperature=m["temperature"],
                       train_seconds=s["train_seconds"], rollbacks=s["rollbacks"], recipe=s.get("recipe"),
                       ece_vs_baseline=m.get("ece_vs_reference", {}).get("raw"),
                       accuracy_vs_baseline=m.get("accuracy_vs_reference"),
                       boundary_l2=m.get("steepness", {}).get("boundary_l2"), auroc=aurocs(m["ood"]))
        runs.append(row)
    if "jem" in metrics and "baseline" in metrics:
        oods = [ood_row(seed, label, metrics["jem"], metrics["baseline"]) for label in ood_labels(ood).values()]
        gen = metrics["jem"].get("generation")
        gens = [{"seed": seed, "fd": gen["fd_ref"], "fd_inf": gen.get("fd_inf", {}), "accuracy": gen.get("ref_accuracy", {}),
                 "by_length": gen.get("fd_by_chain_length", {})}] if gen else []
    return runs, oods, gens


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def health_cell(r: dict) -> str:
    """The healthy share of JEM iterations, and in brackets the share whose chains overshot the data (health.py)."""
    if r.get("healthy") is None:
        return "—"
    return f"{100 * r['healthy']:.0f}%" + (f" ({100 * r['overshoot']:.0f}%)" if r.get("overshoot") else "")


def tables(runs: list, oods: list, gens: list) -> list[str]:
    lines = ["| seed | run | test acc | − baseline's [95%] | train acc (last epoch) | ECE | ECE − baseline's [95%] "
             "| ECE (TS) | T | boundary L2 | train s | rollbacks | healthy (overshooting) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("failed") or "test_accuracy" not in r:
            lines.append(f"| {r['seed']} | {r['run']} | FAILED: {r.get('failed')} |")
            continue
        lines.append("| " + " | ".join(map(str, [
            r["seed"], r["run"], f"{100 * r['test_accuracy']:.2f}%",
            format_difference(r["accuracy_vs_baseline"]) if r.get("accuracy_vs_baseline") else "—",
            pct(r.get("train_accuracy")), pct(r.get("ece")),
            format_difference(r["ece_vs_baseline"]) if r.get("ece_vs_baseline") else "—", pct(r.get("ece_ts")),
            f"{r['temperature']:.2f}" if r.get("temperature") else "—",
            f"{r['boundary_l2']:.2f}" if r.get("boundary_l2") is not None else "—", f"{r['train_seconds']:.0f}", r["rollbacks"],
            health_cell(r)])) + " |")
    for kind in ("jem", "baseline"):
        good = [r for r in runs if r["run"] == kind and r.get("ece") is not None]
        if len(good) > 1:
            acc, ece = np.array([r["test_accuracy"] for r in good]), np.array([r["ece"] for r in good])
            diff = np.array([r["accuracy_vs_baseline"]["diff"] for r in good if r.get("accuracy_vs_baseline")])
            lines.append(f"| mean ± sd | {kind} | {100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f}% | "
                         + (f"{100 * diff.mean():+.2f} ± {100 * diff.std(ddof=1):.2f}" if len(diff) > 1 else "")
                         + f" | | {100 * ece.mean():.2f} ± {100 * ece.std(ddof=1):.2f}% |")
    lines += ["", "OOD (AUROC, FPR at 95% TPR in brackets; the best of each side chosen per set; the verdict of the "
              "JEM's own against the baseline's best: won or lost when the 95% paired bootstrap interval of the "
              "difference over the scored images excludes 0, else tied — the test images' noise, not the "
              "training's):", "",
              "| seed | OOD set | JEM log p(x) | JEM's best own | best post-hoc on the baseline | best post-hoc on the JEM "
              "| JEM own − best post-hoc | JEM own vs the baseline's best: verdict (AUROC / FPR95) |",
              "|---|---|---|---|---|---|---|---|"]
    for o in oods:
        lines.append(f"| {o['seed']} | {o['set']} | {o['jem_logp']:.3f} | {o['own']} {o['own_auroc']:.3f} "
                     f"({o['own_fpr95']:.2f}) | {o['base_best']} {o['base_auroc']:.3f} ({o['base_fpr95']:.2f}) | "
                     f"{o['jem_posthoc']} {o['jem_posthoc_auroc']:.3f} ({o['jem_posthoc_fpr95']:.2f}) | "
                     f"{o['own_minus_best']:+.3f} ({o['own_minus_best_fpr95']:+.2f}) | {o.get('verdict', '—')} |")
    seeds = sorted({o["seed"] for o in oods})
    for label in dict.fromkeys(o["set"] for o in oods) if len(seeds) > 1 else ():
        rows = [o for o in oods if o["set"] == label]
        m = lambda k, rows=rows: np.mean([o[k] for o in rows])  # noqa: E731
        lines.append(f"| mean | {label} | {m('jem_logp'):.3f} | {m('own_auroc'):.3f} ({m('own_fpr95'):.2f}) | "
                     f"{m('base_auroc'):.3f} ({m('base_fpr95'):.2f}) | {m('jem_posthoc_auroc'):.3f} "
                     f"({m('jem_posthoc_fpr95'):.2f}) | {m('own_minus_best'):+.3f} ({m('own_minus_best_fpr95'):+.2f}) "
                     f"| {' '.join(o.get('verdict', '—') for o in rows)} |")
    if gens:
        sets = list(gens[0]["fd"])
        lines += ["", "JEM samples in the baseline's features: Fréchet distance to test images (the baseline's "
                  "accuracy on the class they were drawn for):", "", "| seed | " + " | ".join(sets) + " |",
                  "|---|" + "---|" * len(sets)]
        for g in gens:
            lines.append(f"| {g['seed']} | " + " | ".join(
                f"{g['fd'][k]:.1f}" + (f" ({g['accuracy'][k]:.2f})" if k in g["accuracy"] else "") for k in sets) + " |")
        steps = list(gens[0]["by_length"])
        lines += ["", "The fresh class-conditional chains on the way (steps: FD (the baseline's accuracy)):", "",
                  "| seed | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
        for g in gens:
            lines.append(f"| {g['seed']} | " + " | ".join(
                f"{v['fd']:.1f} ({v['accuracy']:.2f})" for v in g["by_length"].values()) + " |")
        lines += ["", "The sample line (issue 24: ≤ 0.5): the chains' FD after the last length ÷ the starts', the "
                  "same above the floor, (FD − floor) ÷ (starts' FD − floor), and the ratio of their FD∞ (the FD "
                  "extrapolated to infinitely many images): the FD of n images carries a bias of about k/n that the "
                  "floor shows and FD∞ removes (benchmarks/sample_draws.py):", "",
                  "| seed | chains ÷ starts | above the floor | FD∞ ÷ FD∞ |", "|---|---|---|---|"]
        for g in (g for g in gens if "0" in g["by_length"] and len(g["by_length"]) > 1):  # older runs: no path
            last = max(g["by_length"], key=int)  # the longest chains, as tradeoff.py reads them
            ends, start = g["by_length"][last]["fd"], g["by_length"]["0"]["fd"]
            floor = g["fd"].get("real train (floor)", float("nan"))
            inf = g["fd_inf"]  # FD∞ of those chains and of their starts (runs evaluated before it: none)
            fresh = f"fresh chains ({last} steps)"
            by_inf = f"{inf[fresh] / inf['chain starts (0 steps)']:.3f}" if fresh in inf else "—"
            lines.append(f"| {g['seed']} | {ends / start:.3f} | {(ends - floor) / (start - floor):.3f} | {by_inf} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--labels-per-class", type=int, default=-1, help="semi-supervised: labels kept per class")
    p.add_argument("--ood", default=None, help="OOD sets for jem eval (default depends on the dataset; folders allowed)")
    p.add_argument("--n", type=int, default=2000, help="test images scored per OOD set")
    p.add_argument("--n-gen", type=int, default=1000, help="samples per set for the Fréchet distances")
    p.add_argument("--sample-steps", type=int, default=200, help="chain steps of the fresh samples (jem eval's default)")
    p.add_argument("--sample-step-cap", type=float, default=None, metavar="RMS",
                   help="the fresh samples' step cap (jem eval --sample-step-cap; default: the run's); the tables "
                        "are then written as quality-cap<RMS>.*, the run's own kept")
    p.add_argument("--out", default=None)
    p.add_argument("--ood-only", action="store_true", help="evaluate OOD detection alone (no calibration, no samples)")
    p.add_argument("--baseline-runs", default=None,
                   help="compare with the trained classifiers ROOT/seed<s>/baseline (another quality --out, say) "
                        "instead of training one: a JEM on one network against a classifier on another")
    p.add_argument("--branch-from", default=None, metavar="ROOT",
                   help="train each JEM as a branch of ROOT/seed<s>/jem after --from-epoch (kept there by "
                        "--keep-epochs): only the epochs after it are trained")
    p.add_argument("--from-epoch", type=int, default=None, help="the epoch of --branch-from")
    p.add_argument("--baseline-pseudo-label", type=float, default=0.0, metavar="W",
                   help="semi-supervised: the baseline trains with Pseudo-Label at weight W (jem train "
                        "--pseudo-label-weight) and the JEM without, unless its flags say otherwise: the JEM against "
                        "a semi-supervised classifier, not one that sees only the labelled images")
    p.add_argument("--baseline-vat", type=float, default=0.0, metavar="W",
                   help="semi-supervised: the baseline trains with virtual adversarial training at weight W (jem train "
                        "--vat-weight; its --vat-eps and --vat-entropy as the flags after -- say) and the JEM without")
    args, rest = p.parse_known_args()
    for flag, w in (("--baseline-pseudo-label", args.baseline_pseudo_label), ("--baseline-vat", args.baseline_vat)):
        if w and (args.labels_per_class <= 0 or args.baseline_runs):
            p.error(f"{flag} needs --labels-per-class and a baseline trained here (not --baseline-runs)")
    if (args.branch_from is None) != (args.from_epoch is None):
        p.error("--branch-from and --from-epoch go together")
    try:
        check_sample_step_cap(args.sample_step_cap)
    except ValueError as e:
        p.error(str(e))
    extra = rest[1:] if rest[:1] == ["--"] else rest
    tag = args.dataset + (f"-ssl{args.labels_per_class}" if args.labels_per_class > 0 else "")
    out_root = Path(args.out or f"runs/quality/{tag}")
    flags = {**train_flags(extra), "dataset": args.dataset, "data_root": args.data_root,
             "labels_per_class": args.labels_per_class, "progress": False}
    ood = tuple((args.ood or DEFAULT_OOD.get(args.dataset, "interp,uniform,constant")).split(","))
    for name in ood:  # before any training: a typo must not cost a 45-minute run
        check_ood_name(name, args.dataset)
    data = load_dataset(args.dataset, args.data_root)
    runs, oods, gens = [], [], []
    ssl = {k: w for k, w in (("pseudo_label_weight", args.baseline_pseudo_label), ("vat_weight", args.baseline_vat))
           if w}  # the baseline's alone
    for seed in args.seeds:
        out = out_root / f"seed{seed}"
        given = Path(args.baseline_runs) / f"seed{seed}" / "baseline" if args.baseline_runs else None
        branch = (Path(args.branch_from) / out.name / "jem", args.from_epoch, extra) if args.branch_from else None
        r, o, g = evaluate_pair(seed, out, train_pair({**flags, "seed": seed}, out, data, given, branch, ssl), ood, args)
        runs, oods, gens = runs + r, oods + o, gens + g
    cfg = resolve_config({**flags, "seed": args.seeds[0]})
    head = (f"{args.dataset}, recipe {cfg.recipe}, model {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
            f"labels/class {'all' if args.labels_per_class < 0 else args.labels_per_class}, seeds {args.seeds}")
    if args.baseline_pseudo_label:
        head += f", baseline with Pseudo-Label (weight {args.baseline_pseudo_label:g})"
    if args.baseline_vat:
        head += f", baseline with VAT (weight {args.baseline_vat:g}, eps {cfg.vat_eps:g})"
    name = "quality-ood" if args.ood_only else "quality"
    if args.sample_step_cap is not None and not args.ood_only:
        head += f", fresh chains at step cap {args.sample_step_cap:g}"
        name += f"-cap{args.sample_step_cap:g}"
    write_table(out_root, name, head,
                [f"**{head}**", ""] + tables(runs, oods, gens),
                {"runs": runs, "ood": oods, "samples": gens})
    return 0


def write_table(out: Path, name: str, head: str, lines: list[str], rows) -> None:
    """Print the markdown tables; write them to out/<name>.md and the rows to out/<name>.json."""
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps({"header": head, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
