"""The ``jem`` command.

    jem train [--dataset digits] [--model cnn] [--config FILE] [--any-config-flag VALUE ...]
    jem train --resume RUN_DIR [--epochs N ...]
    jem train --resume RUN_DIR --from-epoch E --out NEW_DIR [--px-tail-scale S ...]   (a branch; RUN_DIR is only read)
    jem eval RUN_DIR [RUN_DIR ...]        jem attack RUN_DIR ...        jem distal RUN_DIR --class C
    jem score RUN_DIR PATH [PATH ...]     jem export RUN_DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from .attacks import DEFAULT_EPS, THREAT_MODELS, check_threat_model, parse_eps
from .checkpoint import CheckpointError
from .config import add_config_arguments, format_sources, resolve_with_sources, resume_changes
from .data import DatasetError
from .detectors import detector_names
from .distributed import Dist, exit_process
from .evaluate import EvalOptions, check_sample_step_cap, difference_text, evaluate_runs
from .inference import ScoreTable, export, load
from .robustness import AttackOptions, attack_runs, distal_runs
from .rundir import CONFIG, CONFIG_SOURCES, RunDir, TensorBoardLog
from .train import Trainer, TrainingDiverged

USER_ERRORS = (ValueError, DatasetError, CheckpointError, FileNotFoundError)


def _os_error_line(e: OSError) -> str:
    """An OSError as one line: what failed, on which file."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, non-zero exit
        self.exit(2, f"jem: error: {message}\n")


class _Help(argparse.HelpFormatter):
    """Shows a flag's default once: unless its help already names it, or it has none worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


TRUST_HELP = ("import user code a run or an export names as its model (package.module:function or file.py:function); "
              "without it such a model is refused")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jem", description="Train and use Joint Energy-based Models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # config flags carry their defaults in their help text (flags default to None so only given ones override)
    t = sub.add_parser("train", help="train a JEM (default: digits, small CNN)")
    t.add_argument("--config", help="JSON or TOML file of config entries (CLI flags override it)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--from-epoch", type=int, metavar="E", help="with --resume and --out NEW: branch off — start NEW as "
                   "RUN_DIR was after epoch E (kept by --keep-epochs E) and train on with the flags given; RUN_DIR is "
                   "only read")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that already has a run")
    t.add_argument("--trust-code", action="store_true", help="import user code that a --config file or the resumed "
                   "run names as its model (a --model given on this command line is trusted)")
    add_config_arguments(t)

    c = sub.add_parser("config", help="print the resolved training configuration: every value and the layer it came "
                                      "from (default, recipe, preset file, resumed run, config file, flag)")
    c.add_argument("--config", help="JSON or TOML file of config entries (CLI flags override it)")
    c.add_argument("--resume", metavar="RUN_DIR", help="the configuration a resume of RUN_DIR would train with")
    c.add_argument("--json", action="store_true", help="print {entry: {value, source}} as JSON")
    add_config_arguments(c)

    e = sub.add_parser("eval", help="evaluate runs: accuracy, calibration, OOD detection, samples, generation quality",
                       formatter_class=_Help)
    e.add_argument("runs", nargs="+", metavar="RUN_DIR", help="one or more run directories, compared side by side")
    e.add_argument("--ood", default="interp,uniform,gaussian,constant",
                   help="comma-separated OOD sets: interp, uniform, gaussian, constant, any dataset name, or a path "
                        "to a folder of images (flat or class subfolders)")
    e.add_argument("--n", type=int, default=2000, help="test images scored, and images per OOD set (-1: all)")
    e.add_argument("--bins", type=int, default=15, help="equal-width bins for ECE and the reliability diagram")
    e.add_argument("--sample-steps", type=int, default=200, help="SGLD steps of the fresh sample chains")
    e.add_argument("--sample-step-cap", type=float, default=None, metavar="RMS",
                   help="step cap of the fresh sample chains, RMS move per pixel and step (default: the run's "
                        "--sample-step-cap, else its --sgld-step-cap); a smaller one follows the energy more closely")
    e.add_argument("--n-samples", type=int, default=100, help="images per sample grid")
    e.add_argument("--n-gen", type=int, default=500,
                   help="images per set for the Fréchet distances (FD and FD∞; FD∞ removes nearly all of the FD's "
                        "small-sample bias from twice the reference's feature dimensions, part of it below)")
    e.add_argument("--reference", metavar="RUN_DIR", help="classifier whose features define the Fréchet distance "
                   "(default: a baseline among the runs)")
    e.add_argument("--inception-weights", metavar="PATH", help="FID Inception weights file for true FID / IS")
    e.add_argument("--ood-root", help="dataset root for OOD datasets in --ood (default: --data-root, else the run's)")
    e.add_argument("--detectors", default="all", help="OOD detectors: all, or a comma-separated list of logp (= energy), "
                   "maxprob (= msp), gradnorm, maxlogit, mahalanobis, vim, knn, react (jemtorch/detectors.py)")
    _add_common(e)

    a = sub.add_parser("attack", help="adversarial robustness: PGD (with the SGLD-refinement defence), black-box attacks",
                       formatter_class=_Help)
    a.add_argument("runs", nargs="+", metavar="RUN_DIR")
    a.add_argument("--threat-model", choices=THREAT_MODELS, default=None, metavar="{linf,l2}",
                   help="PGD threat model: linf or l2 (default: linf)")
    a.add_argument("--norm", dest="norm_deprecated", default=None, help=argparse.SUPPRESS)  # old spelling, one release
    a.add_argument("--eps", default=None, help="comma-separated ε in [0,1] pixel units, fractions allowed "
                   "(default linf: 0,1/255,2/255,4/255,8/255,16/255; l2: 0,0.25,0.5,1,2)")
    a.add_argument("--n", type=int, default=500, help="test images attacked (-1: all)")
    a.add_argument("--steps", type=int, default=20, help="PGD steps")
    a.add_argument("--step-size", type=float, default=2.5, help="PGD step size as a multiple of eps/steps")
    a.add_argument("--restarts", type=int, default=1, help="PGD random restarts")
    a.add_argument("--refine-steps", default="0", help="comma-separated SGLD refinement steps to evaluate (0: none)")
    a.add_argument("--refine-chains", type=int, default=5, help="duplicated SGLD chains averaged by the defence")
    a.add_argument("--defense-grad", default="full", help="full (differentiate through SGLD) or bpda (straight-through)")
    a.add_argument("--blackbox", default="", help="comma-separated gradient-free attacks: boundary, pointwise, square "
                   "(without --eps, only these run and earlier PGD results are kept)")
    a.add_argument("--boundary-steps", type=int, default=1000)
    a.add_argument("--square-queries", type=int, default=1000)
    a.add_argument("--batch-size", type=int, default=250)
    _add_common(a)

    d = sub.add_parser("distal", help="distal adversarials: push noise to high p(y=c|x)",
                       formatter_class=_Help)
    d.add_argument("runs", nargs="+", metavar="RUN_DIR")
    d.add_argument("--class", dest="cls", type=int, required=True, help="target class index")
    d.add_argument("--n", type=int, default=8, help="images per run")
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--step-size", type=float, default=0.01, help="signed-gradient step in model units ([-1,1] images)")
    _add_common(d, progress=False)

    sc = sub.add_parser("score", help="score new images: class, confidence, log p(x), gradient norm, OOD flag",
                        formatter_class=_Help)
    sc.add_argument("model", metavar="RUN_DIR", help="a run directory, or a folder written by jem export")
    sc.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursively), .npy/.npz arrays")
    sc.add_argument("--out", help="write the scores to this .csv or .json file")
    sc.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sc.add_argument("--tpr", type=float, default=0.95, help="fraction of in-distribution validation images that "
                    "must pass the OOD threshold")
    sc.add_argument("--score", default=None, help="detector behind the OOD flag: logp (= energy), maxprob (= msp), "
                    "gradnorm, maxlogit, mahalanobis, vim, knn, react (default: the one that separates validation "
                    "images best from synthetic outliers, chosen once per weights)")
    sc.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    sc.add_argument("--batch-size", type=int, default=250)
    sc.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sc.add_argument("--no-progress", action="store_true")

    x = sub.add_parser("export", help="export a run's model: model.safetensors + model.json card (+ ONNX)")
    x.add_argument("run", metavar="RUN_DIR")
    x.add_argument("--out", required=True, help="folder to write the export to (new, empty, or an earlier export)")
    x.add_argument("--onnx", action="store_true", help="also write model.onnx (images -> logits; needs onnx)")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    x.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    return parser


def _add_common(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """Flags shared by the commands that read trained runs."""
    p.add_argument("--data-root", help="override the runs' dataset root (also for OOD datasets)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    if progress:
        p.add_argument("--no-progress", action="store_true")


NOT_CONFIG = ("command", "config", "resume", "from_epoch", "overwrite", "json", "trust_code")


def resolve_args(args: argparse.Namespace):
    """The configuration ``jem train``/``jem config`` arguments ask for: (config, sources, run directory, changes a
    resume makes or None, the run a branch starts from or None). Checks everything it can before anything is
    written."""
    overrides = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    epoch = getattr(args, "from_epoch", None)
    if not args.resume:
        if epoch is not None:
            raise ValueError("--from-epoch branches a run: give the run with --resume RUN_DIR (and the new one with --out)")
        cfg, sources = resolve_with_sources(overrides, args.config)
        return cfg, sources, RunDir(cfg.run_dir), None, None
    run = RunDir(args.resume)
    if not run.checkpoint.is_file() or not (run / CONFIG).is_file():
        raise FileNotFoundError(f"nothing to resume in {run.path}: expected {run.checkpoint} and {CONFIG}")
    source = None
    if epoch is not None:  # a branch: a new run directory that starts where RUN_DIR was after epoch E
        if not run.kept(epoch)[0].is_file():
            kept = sorted({e for f, e in run.kept_files().items() if f.name.startswith("checkpoint")})
            raise FileNotFoundError(f"{run.path} kept no checkpoint after epoch {epoch} (kept: "
                                    f"{', '.join(map(str, kept)) or 'none'}; a run keeps them with --keep-epochs)")
        if overrides.get("out") is None or Path(overrides["out"]).resolve() == run.path.resolve():
            raise ValueError(f"--from-epoch starts a new run: name its folder with --out (not {run.path})")
        source, run = run, RunDir(overrides["out"])
    else:
        for flag in ("out", "name"):
            if overrides.get(flag) is not None and (flag == "name" or Path(overrides[flag]).resolve() != run.path.resolve()):
                raise ValueError(f"--resume continues in {run.path} itself; --{flag} cannot send it elsewhere (to "
                                 f"branch off into a new folder: --from-epoch E with --keep-epochs E)")
    origin = source or run
    base = {**origin.read_config(), "out": str(run.path)}
    cfg, sources = resolve_with_sources(overrides, args.config, base)
    old = origin.read_json(CONFIG_SOURCES)  # what the resumed values came from when the run started
    sources = {k: (old.get(k, v) if v == "resumed run" and isinstance(old.get(k), str) else v) for k, v in sources.items()}
    return cfg, sources, run, resume_changes(base, cfg), source


def cmd_config(args: argparse.Namespace) -> int:
    cfg, sources, _, _, _ = resolve_args(args)
    if args.json:
        values = json.loads(json.dumps(cfg.to_dict()))
        print(json.dumps({k: {"value": values[k], "source": sources[k]} for k in values}, indent=1))
    else:
        print(format_sources(cfg, sources))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg, sources, run, changed, source = resolve_args(args)
    if cfg.tensorboard:  # before anything is written
        TensorBoardLog.check_available()
    dist = Dist.from_env(cfg.device)  # torchrun: join the process group; otherwise one process
    ok = False
    try:
        rc = _train(args, cfg, sources, run, dist, changed, source)
        ok = True
        return rc
    except (RuntimeError, ConnectionError) as e:
        if not (dist.enabled and lost_peer(e)):
            raise
        print(f"jem: error: rank {dist.rank} lost the other processes ({str(e).strip().splitlines()[0][:120]}): one "
              f"was killed or its machine went away. The last checkpoint is {run.checkpoint}; continue with: torchrun "
              f"... -m jemtorch train --resume {run.path}", file=sys.stderr)
        return 1
    finally:
        dist.close(ok)


def lost_peer(e: BaseException) -> bool:
    """Is ``e`` torch.distributed reporting a peer that is gone (not a bug of ours)?"""
    import torch.distributed as td

    text = str(e).lower()
    return isinstance(e, (ConnectionError, getattr(td, "DistError", ConnectionError))) or any(
        w in text for w in ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out"))


def _train(args: argparse.Namespace, cfg, sources: dict, run: RunDir, dist: Dist, changed: Optional[dict],
           source: Optional[RunDir] = None) -> int:
    say = (lambda msg: print(msg, file=sys.stderr)) if dist.is_main else (lambda msg: None)
    if dist.is_main:  # rank 0 alone decides about and writes into the run directory
        run.check_links()  # nothing of it may lead elsewhere
    if (not args.resume or source is not None) and dist.is_main:
        run.check_new_run(args.overwrite)
        if run.has_run:
            run.remove_train_outputs()
        if source is not None:
            run.branch_from(source, args.from_epoch)
            say(f"jem train: branching {source.path} after epoch {args.from_epoch} into {run.path}")
    trusted = args.trust_code or args.model is not None  # a model named on this command line is the user's own
    trainer = Trainer(cfg, dist=dist, trust_code=trusted)
    if dist.is_main:
        trainer.run.write_config(cfg, sources)  # folder, marker, config: an unwritable --out fails here
    if args.resume:
        trainer.resume(changed)
        if changed:
            say("jem train: resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    n_params = sum(p.numel() for p in trainer.state.jem.parameters())
    steps = f"{cfg.sgld_steps}–{cfg.sgld_steps_max}" if cfg.sgld_steps_max > cfg.sgld_steps else cfg.sgld_steps
    kind = "classifier baseline" if not cfg.uses_samples else f"JEM, {steps} SGLD steps/iteration"
    s = trainer.splits
    procs = (f", {dist.world_size} processes × batch {cfg.batch_size} = global batch {cfg.batch_size * dist.world_size}"
             if dist.enabled else "")
    say(f"jem train: {cfg.dataset} {tuple(trainer.data.shape)} ({len(s.x_train)} train / {len(s.x_val)} "
        f"val / {len(s.x_test)} test), {cfg.model} ({n_params / 1e6:.2f}M params), {kind}, "
        f"{trainer.clock.total_iters} iterations on {trainer.device}" + (f" from {trainer.state.step}" if args.resume else "")
        + procs + f"; run directory {cfg.run_dir}")
    try:
        summary = trainer.fit()
    except TrainingDiverged as e:
        print(f"jem: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say(f"\ninterrupted; checkpoint saved. Continue with: jem train --resume {cfg.run_dir}")
        return 130
    if dist.is_main:
        print(json.dumps(summary, indent=2))
        print(f"run directory: {cfg.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.n == 0 or args.n < -1 or args.bins < 1 or args.sample_steps < 0 or args.n_samples < 1 or args.n_gen < 2:
        raise ValueError("--n must be -1 or >= 1, --bins, --n-samples >= 1, --n-gen >= 2, --sample-steps >= 0")
    check_sample_step_cap(args.sample_step_cap)
    ood = tuple(o.strip() for o in args.ood.split(",") if o.strip())
    opts = EvalOptions(ood=ood, n=args.n, bins=args.bins, sample_steps=args.sample_steps,
                       sample_step_cap=args.sample_step_cap, n_samples=args.n_samples,
                       n_gen=args.n_gen, data_root=args.data_root, ood_root=args.ood_root,
                       inception_weights=args.inception_weights, seed=args.seed, progress=not args.no_progress,
                       detectors=detector_names(args.detectors))
    for r in evaluate_runs(args.runs, opts, args.reference, args.device, trust_code=args.trust_code):
        print(f"{r['name']}: accuracy {r['test_accuracy']:.4f}  ECE {r['ece']:.4f}")
        own = r["detectors"]["own"]
        for note in r["detectors"]["fitted_on"].get("notes", []):
            print(f"  note: {note}")
        for o, res in r["ood"].items():
            best = r["detectors"]["best"][o]
            print(f"  {o}: best {best} AUROC {res[best]['auroc']:.3f} FPR95 {res[best]['fpr95']:.3f}; own: " +
                  ", ".join(f"{k} {res[k]['auroc']:.3f}" for k in own))
        for v in r.get("versus_posthoc", []):
            print(f"  {v['set']}: JEM's best own {v['own']} {v['own_auroc']:.3f} vs {v['best']} on {v['best_run']} "
                  f"{v['best_auroc']:.3f}: AUROC {difference_text(v, 'auroc')}, FPR95 {difference_text(v, 'fpr95')}")
        print(f"  report: {Path(r['run']) / 'eval' / 'report.html'}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    threat_model = args.threat_model or "linf"
    if args.norm_deprecated is not None:
        print("jem attack: --norm is deprecated, use --threat-model (the old spelling goes in the next release)",
              file=sys.stderr)
        threat_model = check_threat_model(args.norm_deprecated, "--norm")
    blackbox = tuple(b.strip() for b in args.blackbox.split(",") if b.strip())
    # --blackbox alone runs only the gradient-free attacks (earlier PGD results stay); PGD runs when --eps is given
    eps = [] if (blackbox and args.eps is None) else parse_eps(args.eps or DEFAULT_EPS[threat_model])
    try:
        refine = tuple(int(v) for v in args.refine_steps.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--refine-steps must be comma-separated integers, got {args.refine_steps!r}") from None
    unknown = set(blackbox) - {"boundary", "pointwise", "square"}
    if unknown:
        raise ValueError(f"unknown black-box attack {sorted(unknown)[0]!r}; choose from boundary, pointwise, square")
    if args.n == 0 or args.n < -1 or args.steps < 1 or args.restarts < 1 or min(refine, default=0) < 0:
        raise ValueError("--n must be -1 or >= 1; --steps, --restarts >= 1; --refine-steps >= 0")
    if not (math.isfinite(args.step_size) and args.step_size > 0):
        raise ValueError(f"--step-size must be a finite number > 0, got {args.step_size}")
    if min(args.refine_chains, args.boundary_steps, args.square_queries, args.batch_size) < 1:
        raise ValueError("--refine-chains, --boundary-steps, --square-queries and --batch-size must be >= 1")
    if args.defense_grad not in ("full", "bpda"):
        raise ValueError(f"--defense-grad must be full or bpda, got {args.defense_grad!r}")
    opts = AttackOptions(threat_model=threat_model, eps=eps, n=args.n, steps=args.steps, step_size=args.step_size,
                         restarts=args.restarts, refine_steps=refine, refine_chains=args.refine_chains,
                         defense_grad=args.defense_grad, blackbox=blackbox, boundary_steps=args.boundary_steps,
                         square_queries=args.square_queries, batch_size=args.batch_size, seed=args.seed,
                         progress=not args.no_progress)
    res = attack_runs(args.runs, opts, device=args.device, data_root=args.data_root, trust_code=args.trust_code)
    for label, accs in res.items():
        print(f"{label}: " + "  ".join(f"eps={e}: {a:.3f}" for e, a in accs.items()))
    for r in args.runs:
        print(f"  report: {Path(r) / 'robustness' / 'report.html'}")
    return 0


def cmd_distal(args: argparse.Namespace) -> int:
    if args.n < 1 or args.steps < 1 or not (math.isfinite(args.step_size) and args.step_size > 0):
        raise ValueError("--n and --steps must be >= 1, --step-size a finite number > 0")
    res = distal_runs(args.runs, args.cls, args.n, args.steps, args.step_size, args.seed, args.device, args.data_root,
                      trust_code=args.trust_code)
    for name, d in res.items():
        print(f"{name}: class {args.cls}: mean p(y|x) {d['mean_confidence']:.3f}, mean log p(x) {d['mean_log_px']:.2f}")
    for r in args.runs:
        print(f"  figure: {Path(r) / 'robustness' / f'distal_class{args.cls}.png'}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    if not 0 < args.tpr <= 1 or args.batch_size < 1:
        raise ValueError("--tpr must be in (0, 1] and --batch-size >= 1")
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix.lower() not in (".csv", ".json"):
            raise ValueError(f"--out must end in .csv or .json, got {out}")
        if out.is_dir() or (out.exists() and not args.overwrite):
            raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    model = load(args.model, args.device, trust_code=args.trust_code)
    cal = model.calibration
    for note in model.notices:
        print(f"jem score: {note}", file=sys.stderr)
    table = model.score_paths(args.paths, tpr=args.tpr, score=args.score, batch_size=args.batch_size,
                              progress=not args.no_progress)
    score = table.score
    how = cal.reason() if args.score is None else f"{score} (chosen with --score)"
    print(f"OOD flag: {score} < {table.threshold:.4g} ({args.tpr:.0%} of validation images pass); score: {how}",
          file=sys.stderr)
    print("\t".join(ScoreTable.COLUMNS))
    for r in table.rows:
        print(f"{r['path']}\t{r['pred']}\t{r['class']}\t{r['confidence']:.4f}\t{r['logp']:.4f}\t{r['gradnorm']:.4g}\t"
              f"{'OOD' if r['ood'] else 'in'}")
    if table.converted:
        print(f"jem score: {table.converted} images converted to the model's {model.input_shape} (channels by luma "
              f"or repetition, bilinear resize with antialiasing, as jem eval does)", file=sys.stderr)
    for path, err in table.failures:
        print(f"jem score: skipped {path}: {err}", file=sys.stderr)
    print(f"jem score: {len(table.rows)} images scored, {table.n_ood} flagged OOD, {len(table.failures)} skipped",
          file=sys.stderr)
    if out is not None:
        table.write(out)
        print(f"jem score: wrote {out}", file=sys.stderr)
    if not table.rows:
        print("jem: error: no image could be read", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    card = export(args.run, args.out, onnx=args.onnx, overwrite=args.overwrite, trust_code=args.trust_code)
    files = ["model.safetensors", "model.json"] + ([card["onnx"]] if card.get("onnx") else [])
    print(f"exported {args.run} to {args.out}: {', '.join(files)} (OOD score {card['ood']['score']}; load with "
          f"jemtorch.load({str(args.out)!r}))")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    code = _main(argv)
    exit_process(code)  # a torchrun worker ends here (see distributed.exit_process); everything else returns
    return code


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": cmd_train, "config": cmd_config, "eval": cmd_eval, "attack": cmd_attack, "distal": cmd_distal,
                    "score": cmd_score, "export": cmd_export}
        return commands[args.command](args)
    except USER_ERRORS as e:
        print(f"jem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # jem train handles its own (checkpoint first); the other commands just stop
        print("\njem: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # unwritable or read-only run directory, disk full, a file where a folder should be, ...
        print(f"jem: error: {_os_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
