"""``jem eval``: everything the paper measures on a trained run.

Classification (accuracy, NLL) · calibration (ECE, reliability diagram) · OOD detection with the paper's three scores
(log p(x), max_y p(y|x), −‖∂ log p(x)/∂x‖₂; AUROC, AUPR, FPR@95%TPR) · samples (replay buffer and fresh SGLD chains) ·
generation quality (Fréchet distance in a reference classifier's feature space; true FID/IS with Inception weights).

OOD sets: a path to any folder of images (flat or with class subfolders, read recursively; named in the tables by
the folder's name), any dataset name ``load_dataset`` knows (its test split, converted to the run's input shape: grey→RGB by
repeating the channel, RGB→grey by ITU-R 601 luma, resized bilinearly with antialiasing), ``interp`` (midpoints
λ=0.5 of random pairs of in-distribution test images, the paper's "Interp"), ``uniform`` (U(−1, 1) pixels),
``gaussian`` (N(0, 1) pixels clipped to [−1, 1]) and ``constant`` (one U(−1, 1) value per image and channel).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .build import LoadedRun, load_run, load_runs
from .data import (
    DATASETS,
    DatasetError,
    convert_images,
    load_dataset,
    read_image_folder,
    stack_converted,
    to_float,
    to_uint8,
    training_splits,
)
from .energy import JEM, eval_mode, in_batches
from .figures import histogram_figure, reliability_figure, save_grid
from .metrics import (
    bootstrap_ece,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    format_difference,
    frechet_distance,
    ood_metrics,
    paired_difference,
)
from .report import Report
from .robustness import add_robustness_section
from .rundir import EVAL_DIR
from .sampler import frozen

SYNTHETIC_OOD = ("interp", "uniform", "gaussian", "constant")
SCORES = ("logp", "maxprob", "gradnorm")


# ------------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------------
def is_folder_set(name: str) -> bool:
    """An OOD set given as a path to a folder of images (rather than a dataset or synthetic set's name)."""
    return "/" in name or os.sep in name or Path(name).is_dir()


def ood_labels(names) -> dict[str, str]:
    """How each OOD set is named in tables: its name, or a folder's own name (made unique when two collide)."""
    labels: dict[str, str] = {}
    for name in names:
        label = Path(name.rstrip("/")).name or name if is_folder_set(name) else name
        base, k = label, 2
        while label in labels.values():
            label, k = f"{base}-{k}", k + 1
        labels[name] = label
    return labels


def check_ood_name(name: str, in_dataset: Optional[str] = None) -> None:
    """Raise a one-line DatasetError for an unknown OOD set, a missing folder, or the in-distribution dataset."""
    if is_folder_set(name):
        if not Path(name).is_dir():
            raise DatasetError(f"OOD folder {name} not found")
        return
    if name not in SYNTHETIC_OOD and name not in DATASETS:
        raise DatasetError(f"unknown OOD set {name!r}; choose from {', '.join(SYNTHETIC_OOD + tuple(DATASETS))}, "
                           f"or give a path to a folder of images")
    if name == in_dataset:
        raise DatasetError(f"OOD set {name!r} is the in-distribution dataset")


def make_ood_set(name: str, x_in: torch.Tensor, n: int, seed: int = 0, data_root: Optional[str] = None,
                 in_dataset: Optional[str] = None) -> torch.Tensor:
    """``n`` OOD images as floats in [−1, 1] with the shape of ``x_in`` (float in-distribution test images)."""
    check_ood_name(name, in_dataset)
    g = torch.Generator().manual_seed(seed)
    shape = tuple(x_in.shape[1:])
    if name == "uniform":
        return torch.rand((n, *shape), generator=g) * 2 - 1
    if name == "gaussian":
        return torch.randn((n, *shape), generator=g).clamp(-1, 1)
    if name == "constant":
        return (torch.rand((n, shape[0], 1, 1), generator=g) * 2 - 1).expand(n, *shape).contiguous()
    if name == "interp":
        i = torch.randint(0, len(x_in), (n,), generator=g)
        j = (i + torch.randint(1, len(x_in), (n,), generator=g)) % len(x_in)  # a different image
        return 0.5 * x_in[i].cpu() + 0.5 * x_in[j].cpu()
    if is_folder_set(name):  # any folder of images, flat or with class subfolders; no train/ needed
        x, _ = stack_converted(read_image_folder(name, limit=n, seed=seed), shape)
        return to_float(x)
    x = load_dataset(name, data_root).x_test  # a dataset name (checked above)
    x = x[torch.randperm(len(x), generator=g)[:n]]
    return to_float(convert_images(x, shape))


# ------------------------------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------------------------------
def ood_scores(jem: JEM, x: torch.Tensor, batch_size: int = 250, device=None, progress: bool = False,
               desc: str = "scores") -> dict[str, np.ndarray]:
    """The paper's three scores (higher = more in-distribution) for float images ``x``."""
    device = device or next(jem.parameters()).device
    out = {k: [] for k in SCORES}
    with frozen(jem):
        for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
            xb = x[i : i + batch_size].to(device).requires_grad_(True)
            logits = jem(xb)
            logp = logits.logsumexp(1)
            (grad,) = torch.autograd.grad(logp.sum(), xb)  # samples are independent in eval mode: per-sample grads
            out["logp"].append(logp.detach().cpu())
            out["maxprob"].append(logits.detach().softmax(1).max(1).values.cpu())
            out["gradnorm"].append(-grad.flatten(1).norm(dim=1).cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def fresh_samples(run: LoadedRun, n: int, steps: int, y: Optional[torch.Tensor] = None, progress: bool = False,
                  seed: int = 0) -> torch.Tensor:
    """``n`` fresh chains from the run's initial distribution (U(−1, 1) for the paper's recipe: the official
    ``uncond_samples``/``cond_samples`` start), ``steps`` long, with the run's chain update; conditional on ``y``."""
    torch.manual_seed(seed)
    sampler = run.sampler()
    y = y.to(run.device) if y is not None else None
    x0 = sampler.buffer.init.sample(n, y)
    with tqdm(total=steps, desc="fresh SGLD chains" + (" (cond)" if y is not None else ""), disable=not progress,
              leave=False) as bar:
        x = sampler.run_chains(run.jem, x0, y, steps, callback=lambda t: bar.update(1))
    return x.clamp(-1, 1)


def penultimate_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Inputs to the model's last ``nn.Linear`` (its feature space), for float images."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not last:
        raise ValueError("reference model has no nn.Linear head to take features from")
    feats = []
    hook = last[-1].register_forward_pre_hook(lambda mod, inp: feats.append(inp[0].detach().flatten(1).cpu()))
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), eval_mode(model):
            in_batches(model, x, batch_size, device)
    finally:
        hook.remove()
    return torch.cat(feats).numpy()


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
# the whole evaluation of one run
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    ood: tuple = ("interp", "uniform", "gaussian", "constant")
    n: int = 2000  # in-distribution test images scored (and OOD images per set); -1: the whole test set
    bins: int = 15
    sample_steps: int = 200
    n_samples: int = 100
    n_gen: int = 500  # samples per set for the Fréchet distances
    data_root: Optional[str] = None  # overrides the runs' dataset root
    ood_root: Optional[str] = None  # where OOD datasets are read (default: data_root, else the run's root)
    inception_weights: Optional[str] = None
    seed: int = 0
    n_boot: int = 1000  # bootstrap resamples of the test set for the ECE intervals
    progress: bool = True


@dataclass
class EvalResult:
    """One run's evaluation: ``metrics`` (what eval/metrics.json holds), and the arrays its figures are drawn from:
    ``hist`` (set → score → per-image scores; "in" is the in-distribution set) and ``samples`` (grid name → images);
    ``ece_boot``: ECE (raw, "ts") of the shared bootstrap resamples of the test set, for paired comparisons."""

    metrics: dict
    hist: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    ece_boot: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate_run(run: LoadedRun, opts: EvalOptions, reference: Optional[LoadedRun] = None) -> EvalResult:
    """Compute every metric of one run."""
    torch.manual_seed(opts.seed)
    data = run.data
    g = torch.Generator().manual_seed(opts.seed)
    n = len(data.x_test) if opts.n < 0 else min(opts.n, len(data.x_test))
    pick = torch.randperm(len(data.x_test), generator=g)[:n]
    x_in = to_float(data.x_test[pick])

    # classification and calibration on the whole test set
    logits = in_batches(lambda xb: run.jem.logits(to_float(xb)).cpu(), data.x_test, 500, run.device)
    if not torch.isfinite(logits).all():
        raise ValueError(f"{run.run_dir}: the model's logits are not finite on the test set (NaN/inf weights); "
                         f"nothing was evaluated")
    probs = logits.softmax(1)
    acc = (probs.argmax(1) == data.y_test).float().mean().item()
    nll = F.cross_entropy(logits, data.y_test).item()
    bins = calibration_bins(probs, data.y_test, opts.bins)
    ece = expected_calibration_error(probs, data.y_test, opts.bins)
    # temperature scaling fitted on the run's own validation split (the images jem train held out)
    val = training_splits(data, run.cfg.n_valid, run.cfg.seed, "cpu")
    temperature = ece_ts = bins_ts = None
    if len(val.y_val) > 0:
        val_logits = in_batches(lambda xb: run.jem.logits(to_float(xb)).cpu(), val.x_val, 500, run.device)
        temperature = fit_temperature(val_logits, val.y_val)
        probs_ts = (logits / temperature).softmax(1)
        ece_ts = expected_calibration_error(probs_ts, data.y_test, opts.bins)
        bins_ts = calibration_bins(probs_ts, data.y_test, opts.bins)
    # the same resamples of the test images for every run (they depend on the test set's size and the seed only)
    ece_boot = {"raw": bootstrap_ece(probs, data.y_test, opts.bins, opts.n_boot, opts.seed)}
    if ece_ts is not None:
        ece_boot["ts"] = bootstrap_ece(probs_ts, data.y_test, opts.bins, opts.n_boot, opts.seed)

    # OOD detection
    root = opts.ood_root or opts.data_root or run.cfg.data_root
    s_in = ood_scores(run.jem, x_in, progress=opts.progress, desc=f"{run.name}: in-dist scores")
    ood, hist = {}, {"in": {k: s_in[k] for k in SCORES}}
    for name, label in ood_labels(opts.ood).items():
        x_out = make_ood_set(name, x_in, n, seed=opts.seed + 1, data_root=root, in_dataset=run.cfg.dataset)
        s_out = ood_scores(run.jem, x_out, progress=opts.progress, desc=f"{run.name}: {label} scores")
        ood[label] = {k: ood_metrics(s_in[k], s_out[k]) for k in SCORES}
        ood[label]["n"] = len(x_out)
        hist[label] = {k: s_out[k] for k in SCORES}

    # samples
    samples = {}
    if run.buffer is not None:
        buf = run.buffer.cpu()
        samples["buffer"] = buf[torch.randperm(len(buf), generator=g)[: opts.n_samples]]
    c = data.num_classes
    per_class = max(1, opts.n_samples // c)
    samples["fresh"] = fresh_samples(run, opts.n_samples, opts.sample_steps, progress=opts.progress, seed=opts.seed).cpu()
    samples["fresh_cond"] = fresh_samples(run, per_class * c, opts.sample_steps,
                                          y=torch.arange(c).repeat_interleave(per_class), progress=opts.progress,
                                          seed=opts.seed).cpu()

    # generation quality
    generation: dict = {}
    if reference is not None:
        n_gen = min(opts.n_gen, len(data.x_test), len(data.x_train))
        real_test = to_float(data.x_test[torch.randperm(len(data.x_test), generator=g)[:n_gen]])
        real_train = to_float(data.x_train[torch.randperm(len(data.x_train), generator=g)[:n_gen]])
        gen_sets = {"real train (floor)": real_train, "uniform noise": torch.rand_like(real_test) * 2 - 1}
        if run.buffer is not None:
            gen_sets["buffer samples"] = run.buffer.cpu()[torch.randperm(len(run.buffer), generator=g)[:n_gen]]
        gen_sets["fresh samples"] = fresh_samples(run, n_gen, opts.sample_steps, progress=opts.progress,
                                                  seed=opts.seed + 7).cpu()
        f_ref = penultimate_features(reference.jem, real_test)
        generation["fd_ref"] = {k: frechet_distance(penultimate_features(reference.jem, v), f_ref)
                                for k, v in gen_sets.items()}
        generation["fd_ref_protocol"] = (f"Fréchet distance in the penultimate-layer features of the reference "
                                         f"classifier {reference.run_dir} (NOT FID), {n_gen} images per set vs "
                                         f"{n_gen} real test images; fresh samples: {opts.sample_steps} SGLD steps "
                                         f"from the initial distribution ({run.cfg.sgld_init})")
    else:
        generation["fd_ref"] = {"skipped": "no reference classifier: pass --reference RUN_DIR (e.g. a --p-x-weight 0 "
                                           "run on the same dataset) or evaluate together with a baseline run"}
    generation["inception"] = inception_metrics(samples["fresh"], to_float(data.x_test[:len(samples["fresh"])]),
                                                opts.inception_weights)
    if "skipped" not in generation["inception"]:
        generation["inception"]["protocol"] = (f"{opts.n_samples} fresh samples ({opts.sample_steps} chain steps from "
                                               f"the initial distribution ({run.cfg.sgld_init})) vs test images")

    metrics = {
        "run": str(run.run_dir),
        "name": run.name,
        "dataset": run.cfg.dataset,
        "model": run.cfg.model,
        "p_x_weight": run.cfg.p_x_weight,
        "test_accuracy": acc,
        "test_nll": nll,
        "ece": ece,
        "ece_ts": ece_ts,
        "temperature": temperature,
        "ece_bins": opts.bins,
        "ece_binning": f"{opts.bins} equal-width confidence bins over [0, 1], L1 (torchmetrics); ece_ts: after "
                       f"temperature scaling fitted (NLL, LBFGS) on the run's {len(val.y_val)} validation images",
        "calibration": bins,
        "calibration_ts": bins_ts,
        "ece_bootstrap": {k: {"ci": np.quantile(v, [0.025, 0.975]).tolist(), "level": 0.95, "n_boot": len(v),
                              "seed": opts.seed} for k, v in ece_boot.items()},
        "ood": ood,
        "ood_protocol": f"{n} in-distribution test images vs {n} images per OOD set; in-distribution is the positive "
                        f"class; scores: logp = LogSumExp f(x), maxprob = max_y p(y|x), gradnorm = -||d logp/dx||_2",
        "samples": {"sample_steps": opts.sample_steps, "sgld_lr": run.cfg.sgld_lr, "sgld_std": run.cfg.sgld_std},
        "generation": generation,
    }
    return EvalResult(metrics, hist, samples, ece_boot)


def evaluate_runs(run_dirs: list, opts: EvalOptions, reference_dir: Optional[str] = None,
                  device: str = "auto") -> list[dict]:
    """Evaluate one or more runs; write RUN/eval/{metrics.json, figures, report.md, report.html} for each.

    With several runs every report shows all of them side by side. The reference classifier for the Fréchet
    distance is ``reference_dir``, else the first baseline (``p_x_weight == 0``) among the runs, else none.
    Returns each run's metrics.
    """
    datasets: dict = {}
    runs = load_runs(run_dirs, device, opts.data_root, datasets)
    for r in runs[1:]:
        if (r.cfg.dataset, r.data.shape, r.data.num_classes) != (runs[0].cfg.dataset, runs[0].data.shape,
                                                                 runs[0].data.num_classes):
            raise DatasetError(f"incompatible runs: {runs[0].run_dir} is {runs[0].cfg.dataset} "
                               f"{runs[0].data.shape}, {r.run_dir} is {r.cfg.dataset} {r.data.shape}")
    for name in opts.ood:  # before any expensive work
        check_ood_name(name, runs[0].cfg.dataset)
    reference = load_run(reference_dir, device, opts.data_root, datasets) if reference_dir else next(
        (r for r in runs if r.is_baseline), None)
    if reference is not None and (reference.data.shape, reference.data.num_classes) != (runs[0].data.shape,
                                                                                        runs[0].data.num_classes):
        raise DatasetError(f"reference {reference.run_dir} was trained on {reference.cfg.dataset}, not "
                           f"{runs[0].cfg.dataset}")

    results = [evaluate_run(run, opts, reference) for run in runs]
    ref = next((res for run, res in zip(runs, results)
                if reference is not None and Path(run.run_dir).resolve() == Path(reference.run_dir).resolve()), None)
    for res in results:  # ECE minus the reference's, with a paired bootstrap interval (the same test resamples)
        if ref is not None and res is not ref:
            res.metrics["ece_vs_reference"] = {"reference": ref.metrics["name"], **{
                k: paired_difference(res.ece_boot[k], ref.ece_boot[k], res.metrics[key] - ref.metrics[key])
                for k, key in (("raw", "ece"), ("ts", "ece_ts")) if k in res.ece_boot and k in ref.ece_boot}}
    for run, res in zip(runs, results):
        out = run.run_dir / EVAL_DIR
        out.mkdir(parents=True, exist_ok=True)
        c = run.data.num_classes
        files = {}
        for key, x in res.samples.items():
            nrow = max(1, len(x) // c) if key == "fresh_cond" else 10
            files[key] = str(save_grid(x, out / f"samples_{key}.png", nrow=nrow))
        res.metrics["samples"]["files"] = files
        (out / "metrics.json").write_text(json.dumps(res.metrics, indent=2) + "\n")

    metrics = [r.metrics for r in results]
    for run in runs:  # every run's report shows all runs
        out = run.run_dir / EVAL_DIR
        figs = {"reliability": reliability_figure(metrics, out / "reliability.png")}
        for score in SCORES:
            figs[score] = histogram_figure([(r.metrics, r.hist) for r in results], score, out / f"ood_hist_{score}.png")
        rep = build_report(metrics, figs)
        add_robustness_section(rep, [m["run"] for m in metrics])  # written by `jem attack` / `jem distal`, if run
        rep.write(out)
    return metrics


def build_report(results: list[dict], figs: dict) -> Report:
    """The evaluation report of runs' metrics and their figures."""
    rep = Report("jemtorch evaluation report")
    rep.table(["run", "dataset", "model", "p(x) weight"],
              [[r["name"], r["dataset"], r["model"], r["p_x_weight"]] for r in results])
    rep.h2("Classification and calibration")
    rep.table(["run", "test accuracy", "test NLL", f"ECE ({results[0]['ece_bins']} bins)", "ECE after TS", "temperature"],
              [[r["name"], r["test_accuracy"], r["test_nll"], r["ece"], r["ece_ts"], r["temperature"]] for r in results])
    rep.p(f"ECE: {results[0]['ece_binning']}.")
    versus = [r for r in results if "ece_vs_reference" in r]
    if versus:
        rep.table(["run", "reference", "ECE − reference's (points) [95% interval]", "after TS"],
                  [[r["name"], r["ece_vs_reference"]["reference"], format_difference(r["ece_vs_reference"].get("raw")),
                    format_difference(r["ece_vs_reference"].get("ts"))] for r in versus])
        rep.p(f"Intervals: paired bootstrap over the test images ({versus[0]['ece_bootstrap']['raw']['n_boot']} "
              f"resamples shared by every run, percentile); they measure the test set's sampling noise, not the "
              f"spread between training seeds.")
    rep.img(figs["reliability"], "Reliability diagrams (bar labels: images per bin)")
    rep.h2("Out-of-distribution detection")
    rep.p(results[0]["ood_protocol"] + ".")
    sets = list(results[0]["ood"])
    rep.table(["OOD set"] + [f"{r['name']} {s}" for r in results for s in SCORES],
              [[o] + [r["ood"][o][s]["auroc"] for r in results for s in SCORES] for o in sets])
    rep.p("AUROC above (the paper's metric). AUPR and FPR at 95% TPR:")
    rep.table(["run", "OOD set", "score", "AUROC", "AUPR", "FPR95"],
              [[r["name"], o, s, *r["ood"][o][s].values()] for r in results for o in sets for s in SCORES])
    for score in SCORES:
        rep.img(figs[score], f"Histograms of the {score} score, in-distribution vs OOD")
    rep.h2("Samples")
    for r in results:
        st = r["samples"]
        fresh = f"fresh chains, {st['sample_steps']} steps from the initial distribution"
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
            rep.table([f"{r['name']}: set vs real test images", "FD (reference classifier features)"],
                      list(gen["fd_ref"].items()))
            rep.p(gen["fd_ref_protocol"] + ".")
        inc = gen["inception"]
        rep.p(f"{r['name']}: FID / Inception Score: " + (f"skipped: {inc['skipped']}" if "skipped" in inc else
              f"FID {inc['fid']:.2f}, IS {inc['inception_score']:.2f} ± {inc['inception_score_std']:.2f} ({inc['protocol']})"))
    return rep
