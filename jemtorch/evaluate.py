"""``jem eval``: everything the paper measures on a trained run, and the detectors the field compares it with.

Classification (accuracy, NLL) · calibration (ECE with bootstrap intervals, reliability diagrams, temperature
scaling) · OOD detection: every detector of ``detectors.py`` — the JEM's own scores (log p(x), max p(y|x),
−‖∂ log p(x)/∂x‖) and the post-hoc detectors fitted on the run's training split (MaxLogit, Mahalanobis, ViM, KNN,
ReAct) — with AUROC, AUPR and FPR at 95% TPR, the best detector per set, and, with a classifier baseline evaluated
alongside, the JEM's best own score against the best detector on either model · samples (replay buffer, fresh
chains) · generation quality: Fréchet distance in a reference classifier's features and that classifier's accuracy
on class-conditional samples, for the chains' starting points, fresh chains and the buffer (true FID/IS with
Inception weights).

OOD sets (``data.make_ood_set``): a folder of images, a dataset name, or the synthetic ``interp``, ``uniform``,
``gaussian``, ``constant``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attacks import steepness
from .build import LoadedRun, load_run, load_runs, run_detectors
from .checkpoint import copy_atomic, write_atomic
from .config import TrainConfig
from .data import DatasetError, check_ood_name, make_ood_set, ood_labels, to_float, to_uint8, training_splits
from .detectors import DETECTORS, OWN, model_outputs
from .energy import in_batches
from .figures import histogram_figure, reliability_figure, save_grid
from .metrics import (
    bootstrap_accuracy,
    bootstrap_ece,
    bootstrap_ood,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    format_difference,
    frechet_distance,
    frechet_distance_infinity,
    ood_metrics,
    paired_difference,
    verdict,
)
from .report import Report
from .robustness import add_robustness_section
from .rundir import EVAL_DIR, RunDir

SCORES = OWN  # the JEM's own scores (kept under this name for 0.1's callers)


@dataclass
class EvalOptions:
    ood: tuple = ("interp", "uniform", "gaussian", "constant")
    n: int = 2000  # in-distribution test images scored (and OOD images per set); -1: the whole test set
    bins: int = 15
    sample_steps: int = 200
    # the fresh chains' step cap (RMS move per pixel and step); None: the run's --sample-step-cap, else its
    # --sgld-step-cap (evaluate.sampling_config). A smaller cap than
    # trained follows the energy's ascent more closely: on CIFAR-10 half the file's cap keeps fresh chains below their
    # starts' FD for 400 steps where the trained cap drifts (docs/results/cifar10.md, "Half the chain step at sampling")
    sample_step_cap: Optional[float] = None
    n_samples: int = 100
    n_gen: int = 500  # samples per set for the Fréchet distances
    data_root: Optional[str] = None  # overrides the runs' dataset root
    ood_root: Optional[str] = None  # where OOD datasets are read (default: data_root, else the run's root)
    inception_weights: Optional[str] = None
    seed: int = 0
    n_boot: int = 1000  # bootstrap resamples of the test set for the ECE intervals
    detectors: tuple = tuple(DETECTORS)  # the JEM's own scores first (detectors.detector_names)
    progress: bool = True


@dataclass
class EvalResult:
    """One run's evaluation: ``metrics`` (what eval/metrics.json holds), and the arrays its figures are drawn from:
    ``hist`` (set → score → per-image scores; "in" is the in-distribution set) and ``samples`` (grid name → images);
    ``boot``: ECE (raw, "ts") and accuracy ("accuracy") of the shared bootstrap resamples of the test set, for paired
    comparisons."""

    metrics: dict
    hist: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    boot: dict[str, np.ndarray] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# samples and features
# ------------------------------------------------------------------------------------------------------------------
CHAIN_LENGTHS = (5, 10, 20, 40, 100)  # fresh chains are also measured on the way to --sample-steps


def check_sample_step_cap(cap: Optional[float]) -> None:
    """``--sample-step-cap`` as `jem eval` and the quality benchmark take it: None (the run's) or > 0."""
    if cap is not None and not cap > 0:
        raise ValueError(f"--sample-step-cap must be > 0 (an RMS move per pixel), got {cap}")


def sampling_config(cfg: TrainConfig, cap: Optional[float] = None) -> TrainConfig:
    """The config fresh chains run with: the step cap ``cap`` (jem eval --sample-step-cap), else the run's
    ``sample_step_cap``, else the training chains' ``sgld_step_cap`` (kept as trained)."""
    cap = cap if cap is not None else (cfg.sample_step_cap or None)
    if cap is None:
        return cfg
    # sample_step_cap first: a chain update without a step cap (PYLD) is then refused by the config's own check
    # naming --sample-step-cap, not --sgld-step-cap
    return replace(replace(cfg, sample_step_cap=cap), sgld_step_cap=cap)


def fresh_chain_path(run: LoadedRun, n: int, lengths: Sequence[int], y: Optional[torch.Tensor] = None,
                     progress: bool = False, seed: int = 0) -> dict[int, torch.Tensor]:
    """``n`` fresh chains from the run's initial distribution (U(−1, 1) for the paper's recipe: the official
    ``uncond_samples``/``cond_samples`` start), run with the run's chain update (conditional on ``y``) and kept at
    each of ``lengths`` (steps > 0): {length: chains}. The chains are stateless between steps, so the chains at the
    longest length are those of one uninterrupted run."""
    torch.manual_seed(seed)
    sampler = run.sampler()
    y = y.to(run.device) if y is not None else None
    x = sampler.buffer.init.sample(n, y)
    path, done = {}, 0
    with tqdm(total=max(lengths), desc="fresh SGLD chains" + (" (cond)" if y is not None else ""),
              disable=not progress, leave=False) as bar:
        for k in sorted(set(lengths)):
            x = sampler.run_chains(run.jem, x, y, k - done, callback=lambda t: bar.update(1))
            path[k], done = x.clamp(-1, 1), k
    return path


def fresh_samples(run: LoadedRun, n: int, steps: int, y: Optional[torch.Tensor] = None, progress: bool = False,
                  seed: int = 0) -> torch.Tensor:
    """``n`` fresh chains, ``steps`` long (``fresh_chain_path`` at one length)."""
    return fresh_chain_path(run, n, (steps,), y, progress, seed)[steps]


def scored_test_indices(run: LoadedRun, n: int, g: torch.Generator) -> torch.Tensor:
    """The indices of the ``n`` test images (−1: all) that OOD detection scores as in-distribution, drawn with ``g``."""
    n = len(run.data.x_test) if n < 0 else min(n, len(run.data.x_test))
    return torch.randperm(len(run.data.x_test), generator=g)[:n]


def scored_test_images(run: LoadedRun, n: int, g: torch.Generator) -> torch.Tensor:
    """The ``n`` test images (−1: all) that OOD detection scores as in-distribution, drawn with ``g``."""
    return to_float(run.data.x_test[scored_test_indices(run, n, g)])


def penultimate_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """The features entering the model's head (detectors.classifier_head), for float images."""
    from .energy import JEM

    jem = model if isinstance(model, JEM) else JEM(model)
    return model_outputs(jem, x, batch_size, grad=False).features.numpy()


def inception_metrics(samples: torch.Tensor, real: torch.Tensor, weights: Optional[str]) -> dict:
    """True FID and Inception Score (torchmetrics + torch-fidelity's Inception v3) when weights are available.

    ``weights``: path to the FID Inception weights (pt_inception-2015-12-05-6726825d.pth). Without them, or without
    torch-fidelity importable, returns {"skipped": reason}: nothing is estimated in their place.
    """
    if not weights:
        return {"skipped": "no --inception-weights given (FID/IS need the pt_inception-2015-12-05 weights; offline "
                           "they cannot be downloaded)"}
    if not Path(weights).is_file():
        return {"skipped": f"Inception weights not found at {weights}"}
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore

        to_rgb = lambda x: to_uint8(x).expand(-1, 3, -1, -1).cpu() if x.shape[1] == 1 else to_uint8(x).cpu()
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
        fid.update(to_rgb(real), real=True)
        fid.update(to_rgb(samples), real=False)
        inc = InceptionScore(feature_extractor_weights_path=weights)
        inc.update(to_rgb(samples))
        is_mean, is_std = inc.compute()
        return {"fid": float(fid.compute()), "inception_score": float(is_mean), "inception_score_std": float(is_std),
                "n_samples": len(samples), "n_real": len(real)}
    except Exception as e:  # torch-fidelity missing, torchvision broken, incompatible weights
        return {"skipped": f"FID/IS unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


# ------------------------------------------------------------------------------------------------------------------
# the parts of one run's evaluation
# ------------------------------------------------------------------------------------------------------------------
def calibration(run: LoadedRun, opts: EvalOptions) -> tuple[dict, dict[str, np.ndarray]]:
    """Accuracy, NLL, ECE (raw; after temperature scaling fitted on the run's validation split) with bootstrap
    replicates of accuracy and ECE over the test images (the same resamples for every run: they depend on the test
    set's size and seed)."""
    data = run.data
    logits = in_batches(lambda xb: run.jem.logits(to_float(xb)).cpu(), data.x_test, 500, run.device)
    if not torch.isfinite(logits).all():
        raise ValueError(f"{run.run_dir}: the model's logits are not finite on the test set (NaN/inf weights); "
                         f"nothing was evaluated")
    probs = logits.softmax(1)
    m = {"test_accuracy": (probs.argmax(1) == data.y_test).float().mean().item(),
         "test_nll": F.cross_entropy(logits, data.y_test).item(), "ece": expected_calibration_error(probs, data.y_test,
                                                                                                   opts.bins),
         "calibration": calibration_bins(probs, data.y_test, opts.bins), "ece_ts": None, "temperature": None,
         "calibration_ts": None, "ece_bins": opts.bins}
    boot = {"raw": bootstrap_ece(probs, data.y_test, opts.bins, opts.n_boot, opts.seed)}
    val = training_splits(data, run.cfg.n_valid, run.cfg.seed, "cpu")
    if len(val.y_val) > 0:
        val_logits = in_batches(lambda xb: run.jem.logits(to_float(xb)).cpu(), val.x_val, 500, run.device)
        m["temperature"] = fit_temperature(val_logits, val.y_val)
        probs_ts = (logits / m["temperature"]).softmax(1)
        m["ece_ts"] = expected_calibration_error(probs_ts, data.y_test, opts.bins)
        m["calibration_ts"] = calibration_bins(probs_ts, data.y_test, opts.bins)
        boot["ts"] = bootstrap_ece(probs_ts, data.y_test, opts.bins, opts.n_boot, opts.seed)
    m["ece_binning"] = (f"{opts.bins} equal-width confidence bins over [0, 1], L1 (torchmetrics); ece_ts: after "
                        f"temperature scaling fitted (NLL, LBFGS) on the run's {len(val.y_val)} validation images")
    m["ece_bootstrap"] = {k: {"ci": np.quantile(v, [0.025, 0.975]).tolist(), "level": 0.95, "n_boot": len(v),
                              "seed": opts.seed} for k, v in boot.items()}
    boot["accuracy"] = bootstrap_accuracy(probs.argmax(1) == data.y_test, opts.n_boot, opts.seed)
    return m, boot


def ood_detection(run: LoadedRun, opts: EvalOptions, x_in: torch.Tensor) -> tuple[dict, dict]:
    """Every detector's AUROC / AUPR / FPR95 on every OOD set (in-distribution: ``x_in``), the best per set, and the
    per-image scores for the histograms."""
    dets = run_detectors(run, progress=opts.progress)
    names = [n for n in opts.detectors if n in dets.names]
    root = opts.ood_root or opts.data_root or run.cfg.data_root
    s_in = dets.score(run.jem, x_in, progress=opts.progress, desc=f"{run.name}: in-dist scores")
    ood, hist = {}, {"in": {k: s_in[k] for k in names}}
    for name, label in ood_labels(opts.ood).items():
        x_out = make_ood_set(name, x_in, len(x_in), seed=opts.seed + 1, data_root=root, in_dataset=run.cfg.dataset)
        s_out = dets.score(run.jem, x_out, progress=opts.progress, desc=f"{run.name}: {label} scores")
        ood[label] = {k: ood_metrics(s_in[k], s_out[k]) for k in names}
        ood[label]["n"] = len(x_out)
        hist[label] = {k: s_out[k] for k in names}
    best = {label: max(names, key=lambda k: r[k]["auroc"]) for label, r in ood.items()}
    info = {"names": names, "own": [n for n in names if n in OWN], "labels": {n: DETECTORS[n].label for n in names},
            "fitted_on": dets.info, "best": best}
    return {"ood": ood, "detectors": info}, hist


def sample_grids(run: LoadedRun, opts: EvalOptions, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Images for the grids: the replay buffer, fresh chains, fresh class-conditional chains (one row per class)."""
    samples = {}
    if run.buffer is not None:
        buf = run.buffer.cpu()
        samples["buffer"] = buf[torch.randperm(len(buf), generator=g)[: opts.n_samples]]
    c = run.data.num_classes
    per_class = max(1, opts.n_samples // c)
    samples["fresh"] = fresh_samples(run, opts.n_samples, opts.sample_steps, progress=opts.progress, seed=opts.seed).cpu()
    samples["fresh_cond"] = fresh_samples(run, per_class * c, opts.sample_steps, progress=opts.progress, seed=opts.seed,
                                          y=torch.arange(c).repeat_interleave(per_class)).cpu()
    return samples


def generation(run: LoadedRun, reference: Optional[LoadedRun], opts: EvalOptions, g: torch.Generator) -> dict:
    """Samples measured in a reference classifier's features: the Fréchet distance of each set to real test images
    (floor: real training images), and the classifier's accuracy on class-conditional samples (their class: the
    one they were drawn for; the buffer: the JEM's own label) — for the chains' starting points, fresh chains of
    ``sample_steps`` steps from there, and the replay buffer."""
    if reference is None:
        return {"fd_ref": {"skipped": "no reference classifier: pass --reference RUN_DIR (e.g. a --p-x-weight 0 run on "
                                      "the same dataset) or evaluate together with a baseline run"}}
    data, c = run.data, run.data.num_classes
    n_gen = min(opts.n_gen, len(data.x_test), len(data.x_train))
    y = torch.arange(c).repeat_interleave(-(-n_gen // c))[:n_gen]
    torch.manual_seed(opts.seed + 7)
    starts = run.sampler().buffer.init.sample(n_gen, y.to(run.device)).cpu()
    path = fresh_chain_path(run, n_gen, [k for k in CHAIN_LENGTHS if k < opts.sample_steps] + [opts.sample_steps],
                            y=y, progress=opts.progress, seed=opts.seed + 7)
    fresh = f"fresh chains ({opts.sample_steps} steps)"
    sets = {"real train (floor)": to_float(data.x_train[torch.randperm(len(data.x_train), generator=g)[:n_gen]]),
            "uniform noise": torch.rand((n_gen, *data.shape), generator=g) * 2 - 1,
            "chain starts (0 steps)": starts, fresh: path.pop(opts.sample_steps).cpu()}
    labels = {"chain starts (0 steps)": y, fresh: y}
    if run.buffer is not None:
        sets["replay buffer"] = run.buffer.cpu()[torch.randperm(len(run.buffer), generator=g)[:n_gen]]
        labels["replay buffer"] = run.jem.logits(sets["replay buffer"]).argmax(1).cpu()
    real_test = to_float(data.x_test[torch.randperm(len(data.x_test), generator=g)[:n_gen]])
    ref_out = {k: model_outputs(reference.jem, v, grad=False) for k, v in {"real test": real_test, **sets}.items()}
    test_features = ref_out["real test"].features.numpy()
    dim = test_features.shape[1]
    fd = {k: frechet_distance(ref_out[k].features.numpy(), test_features) for k in sets}
    fits = {k: frechet_distance_infinity(ref_out[k].features.numpy(), test_features, seed=opts.seed)
            for k in sets if min(n_gen, len(sets[k])) >= 8}  # FD∞ fits subsets of n/2 to n: too few images, none
    acc = {k: float((ref_out[k].logits.argmax(1) == labels[k]).float().mean()) for k in labels}
    by_length = {0: (fd["chain starts (0 steps)"], acc["chain starts (0 steps)"])}
    for k, xk in path.items():  # the same chains on the way: where along them are samples best?
        o = model_outputs(reference.jem, xk.cpu(), grad=False)
        by_length[k] = (frechet_distance(o.features.numpy(), test_features),
                        float((o.logits.argmax(1) == y).float().mean()))
    by_length[opts.sample_steps] = (fd[fresh], acc[fresh])
    return {"fd_ref": fd, "fd_inf": {k: f["fd_inf"] for k, f in fits.items()}, "fd_inf_fit": fits, "ref_accuracy": acc,
            "fd_by_chain_length": {str(k): {"fd": v[0], "accuracy": v[1]} for k, v in sorted(by_length.items())},
            "fd_ref_protocol": (f"Fréchet distance in the features entering the head of the reference classifier "
                                f"{reference.run_dir} (NOT FID), {n_gen} images per set vs {n_gen} real test images; "
                                f"chains start from the run's initial distribution ({run.cfg.sgld_init}), one class "
                                f"after another, and run {opts.sample_steps} steps of its chain update "
                                f"({run.cfg.sgld_update}); ref_accuracy: the reference's accuracy on the class each "
                                f"chain was drawn for (buffer: agreement with the JEM's own label); fd_inf: FD∞, the "
                                f"FD extrapolated to infinitely many images from subsets of {n_gen // 2} to {n_gen} "
                                f"(Chong & Forsyth 2020; metrics.frechet_distance_infinity): the FD of n images is "
                                f"biased up by about k/n, which the floor row shows (0 for the distributions)"
                                + (f"; with fewer than twice as many images as the features' {dim} dimensions FD∞ "
                                   f"keeps part of that bias (the floor's FD∞; --n-gen {2 * dim} removes nearly all)"
                                   if n_gen < 2 * dim else ""))}


def evaluate_run(run: LoadedRun, opts: EvalOptions, reference: Optional[LoadedRun] = None) -> EvalResult:
    """Compute every metric of one run."""
    torch.manual_seed(opts.seed)
    g = torch.Generator().manual_seed(opts.seed)
    x_in = scored_test_images(run, opts.n, g)
    metrics = {"run": str(run.run_dir), "name": run.name, "dataset": run.cfg.dataset, "model": run.cfg.model,
               "p_x_weight": run.cfg.p_x_weight}
    cal, boot = calibration(run, opts)
    ood, hist = ood_detection(run, opts, x_in)
    sampling = replace(run, cfg=sampling_config(run.cfg, opts.sample_step_cap))
    samples = sample_grids(sampling, opts, g)
    gen = generation(sampling, reference, opts, g)
    gen["inception"] = inception_metrics(samples["fresh"], to_float(run.data.x_test[:len(samples["fresh"])]),
                                         opts.inception_weights)
    if "skipped" not in gen["inception"]:
        gen["inception"]["protocol"] = (f"{opts.n_samples} fresh samples ({opts.sample_steps} chain steps from the "
                                        f"initial distribution ({run.cfg.sgld_init})) vs test images")
    metrics.update(cal)
    metrics["steepness"] = steepness(run.jem, x_in)
    metrics.update(ood)
    metrics["ood_protocol"] = (f"{len(x_in)} in-distribution test images vs {len(x_in)} images per OOD set; "
                               f"in-distribution is the positive class; every score: higher = more in-distribution "
                               f"(detectors.py)")
    metrics["samples"] = {"sample_steps": opts.sample_steps, "sgld_lr": sampling.cfg.sgld_lr,
                          "sgld_std": sampling.cfg.final_sgld_std, "sgld_step_cap": sampling.cfg.sgld_step_cap}
    metrics["generation"] = gen
    return EvalResult(metrics, hist, samples, boot)


# ------------------------------------------------------------------------------------------------------------------
# several runs
# ------------------------------------------------------------------------------------------------------------------
def versus_posthoc(jem: EvalResult, others: list[EvalResult], n_boot: int = 1000, seed: int = 0,
                   own_posthoc: bool = True) -> list[dict]:
    """Per OOD set: the JEM's best own score against the best detector on any of the runs (the JEM's post-hoc
    detectors unless ``own_posthoc`` is False, and every detector of the others, whose log p(x) is the Energy score).
    Both sides pick their best per set, with the set known (an oracle choice, the same on both sides). Every run
    scored the same images, so each difference comes with a paired bootstrap interval over those images
    (``metrics.bootstrap_ood``) and a verdict from the JEM's side: won or lost when the interval excludes 0, else
    tied."""
    rows, m = [], jem.metrics
    for label, res in m["ood"].items():
        own = max(m["detectors"]["own"], key=lambda k: res[k]["auroc"], default=None)
        rivals = [(jem, k) for k in m["detectors"]["names"] if k not in OWN] if own_posthoc else []
        rivals += [(o, k) for o in others if label in o.metrics["ood"] for k in o.metrics["detectors"]["names"]]
        if own is None or not rivals:
            continue
        who, k = max(rivals, key=lambda r: r[0].metrics["ood"][label][r[1]]["auroc"])
        best = who.metrics["ood"][label][k]
        row = {"set": label, "own": own, "own_auroc": res[own]["auroc"], "own_fpr95": res[own]["fpr95"],
               "best_run": who.metrics["name"], "best": k, "best_auroc": best["auroc"], "best_fpr95": best["fpr95"],
               "auroc_diff": res[own]["auroc"] - best["auroc"], "fpr95_diff": res[own]["fpr95"] - best["fpr95"]}
        pair = [bootstrap_ood(r.hist["in"][d], r.hist[label][d], n_boot, seed) for r, d in ((jem, own), (who, k))]
        for i, metric in enumerate(("auroc", "fpr95")):
            ci = paired_difference(pair[0][:, i], pair[1][:, i], row[f"{metric}_diff"])["ci"]
            row[f"{metric}_diff_ci"], row[f"{metric}_verdict"] = ci, verdict(ci, metric == "auroc")  # FPR95: lower
        rows.append(row)
    return rows


def difference_text(row: dict, metric: str) -> str:
    """One ``versus_posthoc`` difference as "+0.004 [-0.001, +0.009] tied"."""
    lo, hi = row[f"{metric}_diff_ci"]
    return f"{row[f'{metric}_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] {row[f'{metric}_verdict']}"


def evaluate_runs(run_dirs: list, opts: EvalOptions, reference_dir: Optional[str] = None,
                  device: str = "auto", trust_code: bool = False) -> list[dict]:
    """Evaluate one or more runs; write RUN/eval/{metrics.json, figures, report.md, report.html} for each.

    With several runs every report shows all of them side by side. The reference classifier for the Fréchet
    distance is ``reference_dir``, else the first baseline (``p_x_weight == 0``) among the runs, else none. Every JEM
    is compared with the best post-hoc detector of the baselines among the runs. Returns each run's metrics.
    """
    datasets: dict = {}
    runs = load_runs(run_dirs, device, opts.data_root, datasets, trust_code)
    for r in runs[1:]:
        if (r.cfg.dataset, r.data.shape, r.data.num_classes) != (runs[0].cfg.dataset, runs[0].data.shape,
                                                                 runs[0].data.num_classes):
            raise DatasetError(f"incompatible runs: {runs[0].run_dir} is {runs[0].cfg.dataset} "
                               f"{runs[0].data.shape}, {r.run_dir} is {r.cfg.dataset} {r.data.shape}")
    for name in opts.ood:  # before any expensive work
        check_ood_name(name, runs[0].cfg.dataset)
    for run in runs:  # a step cap a run's chains cannot take: before calibration and OOD, not after
        sampling_config(run.cfg, opts.sample_step_cap)
    for run in runs:  # and before anything is written: eval/ is a real folder of the run, holding no links
        RunDir(run.run_dir).output_dir(EVAL_DIR)
    reference = load_run(reference_dir, device, opts.data_root, datasets, trust_code) if reference_dir else next(
        (r for r in runs if r.is_baseline), None)
    if reference is not None and (reference.data.shape, reference.data.num_classes) != (runs[0].data.shape,
                                                                                        runs[0].data.num_classes):
        raise DatasetError(f"reference {reference.run_dir} was trained on {reference.cfg.dataset}, not "
                           f"{runs[0].cfg.dataset}")
    results = [evaluate_run(run, opts, reference) for run in runs]
    compare_runs(runs, results, reference, opts)
    for run, res in zip(runs, results):
        write_eval(run, res)
    write_report([run.run_dir / EVAL_DIR for run in runs], results)  # every run's report shows all runs
    return [r.metrics for r in results]


def compare_runs(runs: list[LoadedRun], results: list[EvalResult], reference: Optional[LoadedRun],
                 opts: EvalOptions) -> None:
    """Into each JEM's metrics: its accuracy and ECE minus the reference's (paired bootstrap) and the comparison of
    its own scores with the best post-hoc detector on either model (``versus_posthoc``) and on the baselines alone
    (``versus_baseline``)."""
    ref = next((res for run, res in zip(runs, results)
                if reference is not None and Path(run.run_dir).resolve() == Path(reference.run_dir).resolve()), None)
    baselines = [res for run, res in zip(runs, results) if run.is_baseline]
    for run, res in zip(runs, results):
        if ref is not None and res is not ref:  # the same test resamples: a paired interval
            res.metrics["ece_vs_reference"] = {"reference": ref.metrics["name"], **{
                k: paired_difference(res.boot[k], ref.boot[k], res.metrics[key] - ref.metrics[key])
                for k, key in (("raw", "ece"), ("ts", "ece_ts")) if k in res.boot and k in ref.boot}}
            res.metrics["accuracy_vs_reference"] = {"reference": ref.metrics["name"], **paired_difference(
                res.boot["accuracy"], ref.boot["accuracy"], res.metrics["test_accuracy"] - ref.metrics["test_accuracy"])}
        if not run.is_baseline and baselines:
            res.metrics["versus_posthoc"] = versus_posthoc(res, baselines, opts.n_boot, opts.seed)
            # issue 24's question: the JEM's own score against a classifier with a post-hoc detector, alone
            res.metrics["versus_baseline"] = versus_posthoc(res, baselines, opts.n_boot, opts.seed, own_posthoc=False)


def write_eval(run: LoadedRun, res: EvalResult) -> None:
    out = run.run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, x in res.samples.items():
        nrow = max(1, len(x) // run.data.num_classes) if key == "fresh_cond" else 10
        files[key] = str(save_grid(x, out / f"samples_{key}.png", nrow=nrow))
    res.metrics["samples"]["files"] = files
    write_atomic(out / "metrics.json", json.dumps(res.metrics, indent=2) + "\n")


def write_report(outs: list[Path], results: list[EvalResult]) -> None:
    """The report of all runs, with its figures, into each run's eval folder (figures drawn once, then copied)."""
    metrics = [r.metrics for r in results]
    first = outs[0]
    figs = {"reliability": reliability_figure(metrics, first / "reliability.png")}
    shown = [k for k in OWN if all(k in r.hist["in"] for r in results)]
    for score in shown:
        figs[score] = histogram_figure([(r.metrics, r.hist) for r in results], score, first / f"ood_hist_{score}.png")
    for out in outs:
        if out.resolve() != first.resolve():
            for f in figs.values():
                copy_atomic(f, out / f.name)
        rep = build_report(metrics, {k: out / f.name for k, f in figs.items()})
        add_robustness_section(rep, [m["run"] for m in metrics])  # written by `jem attack` / `jem distal`, if run
        rep.write(out)


# ------------------------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------------------------
def build_report(results: list[dict], figs: dict) -> Report:
    """The evaluation report of runs' metrics and their figures."""
    rep = Report("jemtorch evaluation report")
    rep.table(["run", "dataset", "model", "p(x) weight"],
              [[r["name"], r["dataset"], r["model"], r["p_x_weight"]] for r in results])
    calibration_section(rep, results, figs)
    ood_section(rep, results, figs)
    samples_section(rep, results)
    return rep


def calibration_section(rep: Report, results: list[dict], figs: dict) -> None:
    rep.h2("Classification and calibration")
    rep.table(["run", "test accuracy", "test NLL", f"ECE ({results[0]['ece_bins']} bins)", "ECE after TS", "temperature",
               "boundary L2", "RMS ∇ₓE"],
              [[r["name"], r["test_accuracy"], r["test_nll"], r["ece"], r["ece_ts"], r["temperature"],
                r.get("steepness", {}).get("boundary_l2"), r.get("steepness", {}).get("energy_grad_rms")]
               for r in results])
    rep.p(f"ECE: {results[0]['ece_binning']}. Boundary L2: the median first-order L2 distance from a test image to "
          f"the decision boundary in [0, 1] pixel units (the top-two logit margin over its input gradient's norm); RMS "
          f"∇ₓE: the median RMS per pixel of the energy's input gradient (model units). A smooth model has a large "
          f"first and a small second.")
    versus = [r for r in results if "ece_vs_reference" in r]
    if versus:
        rep.table(["run", "reference", "accuracy − reference's (points) [95% interval]", "ECE − reference's",
                   "ECE after TS"],
                  [[r["name"], r["ece_vs_reference"]["reference"], format_difference(r.get("accuracy_vs_reference")),
                    format_difference(r["ece_vs_reference"].get("raw")),
                    format_difference(r["ece_vs_reference"].get("ts"))] for r in versus])
        rep.p(f"Intervals: paired bootstrap over the test images ({versus[0]['ece_bootstrap']['raw']['n_boot']} "
              f"resamples shared by every run, percentile); they measure the test set's sampling noise, not the "
              f"spread between training seeds.")
    rep.img(figs["reliability"], "Reliability diagrams (bar labels: images per bin)")


def ood_section(rep: Report, results: list[dict], figs: dict) -> None:
    rep.h2("Out-of-distribution detection")
    rep.p(results[0]["ood_protocol"] + ". Detectors: the JEM's own scores first (log p(x), max p(y|x), "
          "−‖∇x log p(x)‖), then the post-hoc detectors, fitted on each run's training split: " +
          ", ".join(f"{k} ({v})" for k, v in results[0]["detectors"]["labels"].items()) + ".")
    for r in results:
        for note in r["detectors"]["fitted_on"].get("notes", []):
            rep.p(f"{r['name']}: {note}.")
        names, best = r["detectors"]["names"], r["detectors"]["best"]
        rep.table([f"{r['name']}: OOD set"] + names + ["best"],
                  [[o] + [f"{r['ood'][o][k]['auroc']:.3f}" for k in names] + [best[o]] for o in r["ood"]])
    rep.p("AUROC above. FPR at 95% TPR (lower is better):")
    for r in results:
        names = r["detectors"]["names"]
        rep.table([f"{r['name']}: OOD set"] + names, [[o] + [f"{r['ood'][o][k]['fpr95']:.3f}" for k in names]
                                                       for o in r["ood"]])
    for r in results:
        if r.get("versus_posthoc"):
            rep.p(f"{r['name']}: its best own score vs the best post-hoc detector on any run (both chosen per set); "
                  f"the differences with their 95% paired bootstrap interval over the scored images, and the JEM's "
                  f"verdict (won / lost when the interval excludes 0, else tied):")
            rep.table(["OOD set", "JEM's best own", "AUROC", "FPR95", "best post-hoc", "AUROC", "FPR95", "AUROC diff",
                       "FPR95 diff"],
                      [[v["set"], v["own"], f"{v['own_auroc']:.3f}", f"{v['own_fpr95']:.3f}",
                        f"{v['best']} on {v['best_run']}", f"{v['best_auroc']:.3f}", f"{v['best_fpr95']:.3f}",
                        difference_text(v, "auroc"), difference_text(v, "fpr95")] for v in r["versus_posthoc"]])
    rep.table(["run", "OOD set", "detector", "AUROC", "AUPR", "FPR95"],
              [[r["name"], o, k, *(f"{r['ood'][o][k][m]:.4f}" for m in ("auroc", "aupr", "fpr95"))]
               for r in results for o in r["ood"] for k in r["detectors"]["names"]])
    for score in OWN:
        if score in figs:
            rep.img(figs[score], f"Histograms of the {score} score, in-distribution vs OOD")


def samples_section(rep: Report, results: list[dict]) -> None:
    rep.h2("Samples")
    for r in results:
        st = r["samples"]
        cap = f", step cap {st['sgld_step_cap']:g}" if st.get("sgld_step_cap") else ""
        fresh = f"fresh chains, {st['sample_steps']} steps from the initial distribution{cap}"
        for key, caption in (("buffer", "replay buffer"), ("fresh", fresh),
                             ("fresh_cond", "fresh class-conditional chains, one row per class")):
            if key in st.get("files", {}):
                rep.img(Path(st["files"][key]), f"{r['name']}: {caption}")
    rep.h2("Generation quality")
    for r in results:
        gen = r["generation"]
        if "skipped" in gen["fd_ref"]:
            rep.p(f"{r['name']}: reference-classifier Fréchet distance skipped: {gen['fd_ref']['skipped']}")
        else:
            acc = gen.get("ref_accuracy", {})
            inf = gen.get("fd_inf", {})
            rep.table([f"{r['name']}: set", "FD to real test images (reference features)", "FD∞ (bias removed)",
                       "reference accuracy"],
                      [[k, f"{v:.2f}", f"{inf[k]:.2f}" if k in inf else "—", f"{acc[k]:.3f}" if k in acc else "—"]
                       for k, v in gen["fd_ref"].items()])
            rep.p(gen["fd_ref_protocol"] + ".")
            path = gen.get("fd_by_chain_length", {})
            rep.table([f"{r['name']}: fresh chains, steps"] + list(path), [
                ["FD"] + [f"{v['fd']:.1f}" for v in path.values()],
                ["reference accuracy"] + [f"{v['accuracy']:.2f}" for v in path.values()]])
            rep.p("The same class-conditional chains measured on the way: chains trained short (a few steps per "
                  "iteration from a persistent buffer) are non-convergent samplers (Nijkamp et al. 2020, 'On the "
                  "anatomy of MCMC-based maximum likelihood learning of energy-based models'): their samples improve "
                  "for about as long as the training chains ran, then drift below the data's energy.")
        inc = gen["inception"]
        rep.p(f"{r['name']}: FID / Inception Score: " + (f"skipped: {inc['skipped']}" if "skipped" in inc else
              f"FID {inc['fid']:.2f}, IS {inc['inception_score']:.2f} ± {inc['inception_score_std']:.2f} ({inc['protocol']})"))
