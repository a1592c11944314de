"""``jem attack`` and ``jem distal`` on trained runs: adversarial robustness of JEM vs a plain classifier, as in the
paper (§5.3). The attack maths live in ``attacks.py``; this module picks the test images, runs the attacks, merges the
results into ``RUN/robustness/metrics.json`` and hands figures and report their data.

Units: ε is given for images in [0, 1] (8/255 means 8 grey levels); models see [−1, 1].
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .attacks import Refined, blackbox, check_threat_model, distal, robust_accuracy
from .build import LoadedRun, load_runs
from .checkpoint import write_atomic
from .data import to_float
from .figures import curve_figure, distal_figure
from .report import Report, robustness_section
from .rundir import ROBUSTNESS_DIR, RunDir

METRICS = "metrics.json"
SQUARE_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255)


@dataclass
class AttackOptions:
    """Everything ``jem attack`` can be told (CLI flags of the same names)."""

    threat_model: str = "linf"
    eps: Sequence[float] = ()  # [0, 1] units; empty: no PGD (black-box attacks only)
    n: int = 500  # test images attacked (-1: all)
    steps: int = 20
    step_size: float = 2.5  # PGD step size as a multiple of eps/steps
    restarts: int = 1
    refine_steps: Sequence[int] = (0,)  # SGLD-refinement settings to evaluate (0: undefended)
    refine_chains: int = 5
    defense_grad: str = "full"
    blackbox: Sequence[str] = ()
    boundary_steps: int = 1000
    square_queries: int = 1000
    square_eps: Sequence[float] = SQUARE_EPS
    batch_size: int = 250
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_threat_model(self.threat_model)
        if self.defense_grad not in ("full", "bpda"):
            raise ValueError(f"--defense-grad must be full or bpda, got {self.defense_grad!r}")


def test_subset(run: LoadedRun, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random test images (float, on the run's device) and labels; ``n < 0``: all."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(run.data.x_test), generator=g)[: (len(run.data.x_test) if n < 0 else n)]
    return to_float(run.data.x_test[idx]).to(run.device), run.data.y_test[idx].to(run.device)


def read_metrics(run_dir: Path) -> dict:
    return RunDir(run_dir).read_json(f"{ROBUSTNESS_DIR}/{METRICS}")


def write_metrics(run_dir: Path, metrics: dict) -> None:
    write_atomic(RunDir(run_dir).output_dir(ROBUSTNESS_DIR) / METRICS, json.dumps(metrics, indent=2) + "\n")


def refined_model(run: LoadedRun, refine_steps: int, opts: AttackOptions) -> Refined:
    """The run's classifier behind ``refine_steps`` SGLD steps with the run's own SGLD step size, cap and noise."""
    return Refined(run.jem, refine_steps, opts.refine_chains if refine_steps > 0 else 1, run.cfg.sgld_lr,
                   run.cfg.final_sgld_std, opts.defense_grad, run.cfg.sgld_step_cap, run.cfg.sgld_cap_noise)


def attack_runs(run_dirs: Sequence[str | Path], opts: AttackOptions, device: str = "auto",
                data_root: Optional[str] = None, trust_code: bool = False) -> dict:
    """PGD robust accuracy per ε for each run and defence setting; black-box medians; figures and reports.

    Returns {"<run> (<defence>)": {ε: accuracy}}. A run's stored results for ``opts.threat_model`` are replaced;
    its other results are kept."""
    norm, eps = opts.threat_model, list(opts.eps)
    runs = load_runs(run_dirs, device, data_root, trust_code=trust_code)
    for run in runs:  # before any attack: robustness/ is a real folder of the run, holding no links
        RunDir(run.run_dir).output_dir(ROBUSTNESS_DIR)
    results: dict[str, dict] = {}
    for run in runs:
        torch.manual_seed(opts.seed)
        x, y = test_subset(run, opts.n, opts.seed)
        metrics = read_metrics(run.run_dir)
        if eps:  # this invocation's threat model replaces earlier results for it
            for d in metrics.get("defenses", {}).values():
                d.pop(norm, None)
            metrics["defenses"] = {k: v for k, v in metrics.get("defenses", {}).items() if v}
            metrics.pop(norm, None)  # the undefended curve too: it is set again below only if this run measures it
            settings = opts.refine_steps if not run.is_baseline else (0,)
            if run.is_baseline and any(k > 0 for k in opts.refine_steps):
                print(f"jem attack: {run.name} is a classifier baseline, attacked without the SGLD-refinement defence "
                      "(its logits were never trained as a density)", file=sys.stderr)
            for k in settings:
                model = refined_model(run, k, opts)
                accs = {}
                for e in tqdm(eps, desc=f"{run.name} {model.name} {norm}", disable=not opts.progress, leave=False):
                    accs[f"{e:.6g}"] = robust_accuracy(model, x, y, e, norm, opts.steps, opts.step_size, opts.restarts,
                                                       opts.batch_size)
                metrics.setdefault("defenses", {}).setdefault(model.name, {})[norm] = accs
                if k == 0:
                    metrics[norm] = accs  # the undefended model's curve at the top level
                results[f"{run.name} ({model.name})"] = accs
            metrics.setdefault("pgd", {})[norm] = {
                "steps": opts.steps, "step_size": f"{opts.step_size}*eps/steps", "restarts": opts.restarts,
                "random_start": True, "n": len(y), "eps_units": "[0,1] pixel scale",
                "defense_grad": opts.defense_grad, "refine_chains": opts.refine_chains}
        if opts.blackbox:
            found = blackbox(Refined(run.jem), x, y, list(opts.blackbox), opts.boundary_steps, opts.square_queries,
                             list(opts.square_eps), opts.batch_size)
            metrics["blackbox"] = {**metrics.get("blackbox", {}), **found}
        write_metrics(run.run_dir, metrics)

    curves = {label: ([float(e) for e in accs], list(accs.values())) for label, accs in results.items()}
    for run in runs:
        out_dir = run.run_dir / ROBUSTNESS_DIR
        if curves:
            curve_figure(curves, out_dir / f"robust_{norm}.png", f"ε ({norm}, [0,1] pixel scale)",
                         "robust accuracy", f"PGD-{opts.steps} {norm}")
        write_report(out_dir, [r.run_dir for r in runs])
    return results


def add_robustness_section(rep: Report, run_dirs: Sequence[str | Path]) -> bool:
    """Append each run's stored robustness results to ``rep``; False if none of the runs has any."""
    found = False
    for rd in map(Path, run_dirs):
        m = read_metrics(rd)
        if m:
            found = True
            out_dir = rd / ROBUSTNESS_DIR
            figures = {p.stem: p for p in sorted(out_dir.glob("*.png"))}
            robustness_section(rep, rd.name, m, figures)
    return found


def write_report(out_dir: Path, run_dirs: Sequence[str | Path]) -> None:
    rep = Report("jemtorch robustness report")
    add_robustness_section(rep, run_dirs)
    rep.write(out_dir)


def distal_runs(run_dirs: Sequence[str | Path], cls: int, n: int = 8, steps: int = 200, step_size: float = 0.01,
                seed: int = 0, device: str = "auto", data_root: Optional[str] = None, trust_code: bool = False) -> dict:
    """Distal adversarials for class ``cls`` from each run; one figure with a row per run."""
    runs = load_runs(run_dirs, device, data_root, trust_code=trust_code)
    for run in runs:
        RunDir(run.run_dir).output_dir(ROBUSTNESS_DIR)
    c = runs[0].data.num_classes
    if not 0 <= cls < c:
        raise ValueError(f"--class must be in 0..{c - 1}, got {cls}")
    res = {r.name: distal(r.jem, cls, r.data.shape, n, steps, step_size, seed, r.device) for r in runs}
    for r in runs:  # what log p(x) looks like on real data, to read the samples' values against
        with torch.no_grad():
            res[r.name]["data_log_px"] = r.jem.log_px(to_float(r.data.x_test[:500]).to(r.device)).mean().item()
    title = (f"Distal adversarials for class {cls} ({runs[0].data.classes[cls]}): {steps} signed-gradient steps on "
             f"log p(y|x) from noise")
    summary = {}
    for r in runs:
        out_dir = RunDir(r.run_dir).output_dir(ROBUSTNESS_DIR)
        distal_figure([(x.name, res[x.name]) for x in runs], title, out_dir / f"distal_class{cls}.png")
        d = res[r.name]
        metrics = read_metrics(r.run_dir)
        metrics.setdefault("distal", {})[str(cls)] = {
            "mean_confidence": float(np.mean(d["confidence"])), "mean_log_px": float(np.mean(d["log_px"])),
            "test_data_mean_log_px": d["data_log_px"],
            "confidence": d["confidence"], "log_px": d["log_px"], "steps": steps, "step_size": step_size}
        write_metrics(r.run_dir, metrics)
        summary[r.name] = metrics["distal"][str(cls)]
        write_report(out_dir, [x.run_dir for x in runs])
    return summary
