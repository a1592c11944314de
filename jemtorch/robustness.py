"""``jem attack`` and ``jem distal``: adversarial robustness of JEM vs a plain classifier, as in the paper (§5.3).

Units: ε is given for images in [0, 1] (8/255 means 8 grey levels); models see [−1, 1], so internally ε is doubled.

* White-box PGD (L∞ / L2, random start, restarts) — implemented here, so that it can attack through the defence.
* SGLD-refinement defence (official ``attack_model.py``): ``n_steps_refine`` SGLD steps on log p(x) from the input over
  ``n_dup_chains`` duplicated chains, predictions (softmax) averaged. The attack sees the defence:
  ``full`` differentiates through every SGLD step (create_graph), with the chains' noise as a fresh draw each time
  (expectation over transformation by averaging the chains); ``bpda`` passes the gradient straight through the
  refinement (identity on the backward pass) at the refined point. Neither masks gradients by construction.
* Gradient-free attacks from maintained libraries: foolbox 3 (Boundary: median L2; Pointwise: median L0) and
  torchattacks (Square, score-based black box: median L∞ needed, over an ε grid).
* Distal adversarials: from U(−1, 1) noise, signed-gradient ascent on log p(y=c|x).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .energy import JEM
from .sampler import frozen, sgld

SCALE = 2.0  # [0,1]-pixel units → model units


def parse_eps(text: str) -> list[float]:
    """"0,1/255,0.5" → [0.0, 0.00392…, 0.5]."""
    try:
        eps = [float(Fraction(t.strip())) for t in text.split(",") if t.strip()]
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--eps must be comma-separated numbers or fractions like 8/255, got {text!r}") from None
    if not eps or min(eps) < 0:
        raise ValueError(f"--eps values must be >= 0, got {text!r}")
    return eps


class Refined(nn.Module):
    """p(y|x) of ``jem``, optionally behind the SGLD-refinement defence. Returns log-probabilities (B, C)."""

    def __init__(self, jem: JEM, n_steps: int = 0, n_chains: int = 1, step_size: float = 1.0, noise: float = 0.01,
                 grad: str = "full"):
        super().__init__()
        if grad not in ("full", "bpda"):
            raise ValueError(f"--defense-grad must be full or bpda, got {grad!r}")
        if n_steps < 0 or n_chains < 1:
            raise ValueError("refinement steps must be >= 0 and chains >= 1")
        self.jem, self.n_steps, self.n_chains = jem, n_steps, n_chains
        self.step_size, self.noise, self.grad = step_size, noise, grad

    @property
    def name(self) -> str:
        return "none" if self.n_steps == 0 else f"sgld-{self.n_steps}x{self.n_chains}-{self.grad}"

    def refine(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad == "bpda":
            xs = sgld(self.jem.log_px, x, self.n_steps, self.step_size, self.noise)
            return x + (xs - x).detach()  # forward: refined value; backward: identity
        keep_graph = x.requires_grad
        with torch.enable_grad():
            xr = x if keep_graph else x.detach().requires_grad_(True)
            for _ in range(self.n_steps):
                (g,) = torch.autograd.grad(self.jem.log_px(xr).sum(), xr, create_graph=keep_graph)
                xr = xr + self.step_size * g + self.noise * torch.randn_like(xr)
        return xr if keep_graph else xr.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_steps == 0:
            return self.jem(x).log_softmax(1)
        b = len(x)
        xr = self.refine(x.repeat_interleave(self.n_chains, 0))
        logp = self.jem(xr).log_softmax(1).view(b, self.n_chains, -1)
        return logp.logsumexp(1) - np.log(self.n_chains)  # log of the chains' mean probability


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *[1] * (x.dim() - 1))
        delta = delta * (eps / n).clamp(max=1.0)
    return (x + delta).clamp(-1, 1)


def pgd(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
        steps: int = 20, step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True) -> torch.Tensor:
    """Untargeted PGD on images in [−1, 1]; ``eps`` and ``step_size`` in model units. ``model`` returns log-probs or
    logits. Returns, per image, an adversarial that fools the model in some restart (else the last restart's)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"--norm must be linf or l2, got {norm!r}")
    if eps == 0:
        return x.clone()
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    view = (-1, *[1] * (x.dim() - 1))
    for _ in range(restarts):
        if random_start and norm == "linf":
            x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
        elif random_start:
            d = torch.randn_like(x)
            d = d / d.flatten(1).norm(dim=1).view(view) * eps * torch.rand(len(x), device=x.device).view(view)
            x_adv = x + d
        else:
            x_adv = x.clone()
        x_adv = _project(x_adv, x, eps, norm)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (g,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                if norm == "linf":
                    x_adv = x_adv + step_size * g.sign()
                else:
                    x_adv = x_adv + step_size * g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view(view)
                x_adv = _project(x_adv, x, eps, norm)
        with torch.no_grad():
            now = model(x_adv).argmax(1) != y
        best[~fooled] = x_adv[~fooled].detach()  # images not fooled so far take this restart's result
        fooled |= now
    return best.detach()


def robust_accuracy(model: Refined, x: torch.Tensor, y: torch.Tensor, eps01: float, norm: str, steps: int,
                    step_rel: float, restarts: int, batch_size: int) -> float:
    """Accuracy under PGD at ε (in [0, 1] units); ε = 0 is clean accuracy."""
    correct = 0
    eps = SCALE * eps01
    with frozen(model.jem):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            adv = pgd(model, xb, yb, eps, norm, steps, step_rel * eps / max(steps, 1), restarts)
            with torch.no_grad():
                correct += (model(adv).argmax(1) == yb).sum().item()
    return correct / len(x)


# ------------------------------------------------------------------------------------------------------------------
# gradient-free attacks (maintained libraries), on a [0, 1]-input view of the model
# ------------------------------------------------------------------------------------------------------------------
class ZeroOne(nn.Module):
    """The classifier as the attack libraries expect it: images in [0, 1], logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.model(x01 * 2 - 1)


def _median(values: list[float]) -> Optional[float]:
    v = float(np.median(values)) if values else None
    return None if v is None or not np.isfinite(v) else v


def blackbox(model: Refined, x: torch.Tensor, y: torch.Tensor, attacks: list[str], boundary_steps: int,
             square_queries: int, square_eps: list[float], batch_size: int) -> dict:
    """Median perturbation needed to fool the model, over images it classifies correctly (unfooled count as ∞)."""
    out = {}
    net = ZeroOne(model).eval()
    x01 = (x + 1) / 2
    with torch.no_grad():
        ok = net(x01).argmax(1) == y
    x01, y = x01[ok], y[ok]
    out["n_correct"] = int(ok.sum())
    if len(y) == 0:
        return out
    with frozen(model.jem):
        if "boundary" in attacks or "pointwise" in attacks:
            try:
                import foolbox as fb
            except ImportError:
                raise ValueError("boundary/pointwise attacks need foolbox: pip install 'foolbox>=3.3'") from None
            fmodel = fb.PyTorchModel(net, bounds=(0, 1), device=x.device)
            # (name, attack, its initialisation, measure); images whose initialisation finds no adversarial are
            # counted as unfooled (∞) instead of letting foolbox abort the whole batch
            specs = (("boundary", lambda: fb.attacks.BoundaryAttack(steps=boundary_steps),
                      lambda: fb.attacks.LinearSearchBlendedUniformNoiseAttack(directions=1000, steps=1000), "l2"),
                     ("pointwise", lambda: fb.attacks.PointwiseAttack(),
                      lambda: fb.attacks.SaltAndPepperNoiseAttack(), "l0"))
            for name, attack, init, measure in specs:
                if name not in attacks:
                    continue
                dists = []
                for i in range(0, len(y), batch_size):
                    xb, yb = x01[i : i + batch_size], y[i : i + batch_size]
                    dist = torch.full((len(yb),), float("inf"))
                    _, start, ok = init()(fmodel, xb, yb, epsilons=None)
                    if ok.any():
                        _, adv, success = attack()(fmodel, xb[ok], yb[ok], starting_points=start[ok], epsilons=None)
                        d = (adv - xb[ok]).flatten(1)
                        dd = d.norm(dim=1) if measure == "l2" else (d.abs() > 1e-6).sum(1).float()
                        dist[ok.cpu()] = torch.where(success, dd, torch.full_like(dd, float("inf"))).cpu()
                    dists += dist.tolist()
                out[name] = {f"median_{measure}": _median(dists), "success_rate": float(np.isfinite(dists).mean()),
                             "n": len(dists), "norm": measure,
                             **({"steps": boundary_steps} if name == "boundary" else {})}
        if "square" in attacks:
            try:
                import torchattacks
            except ImportError:
                raise ValueError("the square attack needs torchattacks: pip install --no-deps torchattacks") from None
            needed = torch.full((len(y),), float("inf"))
            for eps in sorted(square_eps):
                todo = torch.isinf(needed).nonzero().flatten()
                if len(todo) == 0:
                    break
                atk = torchattacks.Square(net, norm="Linf", eps=eps, n_queries=square_queries, seed=0)
                for i in range(0, len(todo), batch_size):
                    idx = todo[i : i + batch_size]
                    adv = atk(x01[idx], y[idx])
                    with torch.no_grad():
                        fooled = (net(adv).argmax(1) != y[idx]).cpu()
                    needed[idx.cpu()[fooled]] = eps
            out["square"] = {"median_linf": _median(needed.tolist()), "eps_grid": sorted(square_eps),
                             "success_rate": float(torch.isfinite(needed).float().mean()), "n": len(y),
                             "queries": square_queries, "norm": "linf"}
    return out


# ------------------------------------------------------------------------------------------------------------------
# distal adversarials
# ------------------------------------------------------------------------------------------------------------------
def distal(jem: JEM, cls: int, shape: tuple, n: int = 8, steps: int = 200, step_size: float = 0.01,
           seed: int = 0, device=None) -> dict:
    """From U(−1, 1) noise, ascend log p(y=cls|x) with signed-gradient steps, staying in [−1, 1]."""
    device = device or next(jem.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand((n, *shape), generator=g) * 2 - 1).to(device)
    with frozen(jem):
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(jem.log_p_y_given_x(x)[:, cls].sum(), x)
            x = (x.detach() + step_size * grad.sign()).clamp(-1, 1)
        with torch.no_grad():
            logits = jem(x)
    return {"x": x.cpu(), "confidence": logits.softmax(1)[:, cls].cpu().tolist(),
            "log_px": jem.log_px(logits=logits).cpu().tolist()}


# ------------------------------------------------------------------------------------------------------------------
# the commands: evaluate runs, write RUN/robustness/{metrics.json, figures, report}
# ------------------------------------------------------------------------------------------------------------------
def _test_subset(run, n: int, seed: int):
    from .data import to_float

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(run.data.x_test), generator=g)[: (len(run.data.x_test) if n < 0 else n)]
    return to_float(run.data.x_test[idx]).to(run.device), run.data.y_test[idx].to(run.device)


def _load_metrics(path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def attack_runs(run_dirs: list, norm: str, eps: list[float], n: int = 500, steps: int = 20, step_rel: float = 2.5,
                restarts: int = 1, refine_steps: tuple = (0,), refine_chains: int = 5, defense_grad: str = "full",
                blackbox_attacks: tuple = (), boundary_steps: int = 1000, square_queries: int = 1000,
                square_eps: tuple = (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255), batch_size: int = 250,
                seed: int = 0, device: str = "auto", data_root: Optional[str] = None, progress: bool = True) -> dict:
    """PGD robust accuracy per ε for each run and defence setting; black-box medians; figures and reports."""
    import json

    from tqdm.auto import tqdm

    from .evaluate import load_runs
    from .report import curve_figure

    if norm not in ("linf", "l2"):
        raise ValueError(f"--norm must be linf or l2, got {norm!r}")
    runs = load_runs(run_dirs, device, data_root)
    results = {}
    for run in runs:
        torch.manual_seed(seed)
        x, y = _test_subset(run, n, seed)
        out_dir = run.run_dir / "robustness"
        metrics = _load_metrics(out_dir / "metrics.json")
        if eps:  # this invocation's norm replaces earlier results for it
            for d in metrics.get("defenses", {}).values():
                d.pop(norm, None)
            metrics["defenses"] = {k: v for k, v in metrics.get("defenses", {}).items() if v}
        settings = refine_steps if not run.is_baseline else (0,)
        for k in settings if eps else ():
            model = Refined(run.jem, k, refine_chains if k > 0 else 1, run.cfg.sgld_lr, run.cfg.sgld_std, defense_grad)
            accs = {}
            for e in tqdm(eps, desc=f"{run.name} {model.name} {norm}", disable=not progress, leave=False):
                accs[f"{e:.6g}"] = robust_accuracy(model, x, y, e, norm, steps, step_rel, restarts, batch_size)
            metrics.setdefault("defenses", {}).setdefault(model.name, {})[norm] = accs
            if k == 0:
                metrics[norm] = accs  # the undefended model's curve at the top level
            results[f"{run.name} ({model.name})"] = (run, norm, accs)
        if eps:
            metrics.setdefault("pgd", {})[norm] = {"steps": steps, "step_size": f"{step_rel}*eps/steps",
                                                   "restarts": restarts, "random_start": True, "n": len(y),
                                                   "eps_units": "[0,1] pixel scale", "defense_grad": defense_grad,
                                                   "refine_chains": refine_chains}
        if blackbox_attacks:
            plain = Refined(run.jem)
            metrics["blackbox"] = blackbox(plain, x, y, list(blackbox_attacks), boundary_steps, square_queries,
                                           list(square_eps), batch_size)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    curves = {label: ([float(e) for e in accs], list(accs.values())) for label, (_, nm, accs) in results.items()}
    for run in runs:
        out_dir = run.run_dir / "robustness"
        if curves:
            curve_figure(curves, out_dir / f"robust_{norm}.png", f"ε ({norm}, [0,1] pixel scale)",
                         "robust accuracy", f"PGD-{steps} {norm}")
        write_robustness_report(out_dir, [r.run_dir for r in runs])
    return {label: accs for label, (_, _, accs) in results.items()}


def add_robustness_section(rep, run_dirs) -> bool:
    """Append each run's robustness results (tables, curves, distal grids) to a Report; False if there are none."""
    from pathlib import Path

    found = False
    for rd in run_dirs:
        out_dir = Path(rd) / "robustness"
        m = _load_metrics(out_dir / "metrics.json")
        if not m:
            continue
        found = True
        rep.h2(f"Adversarial robustness: {Path(rd).name}")
        for norm in ("linf", "l2"):
            rows = [[name, norm, eps, acc] for name, d in m.get("defenses", {}).items() for eps, acc in d.get(norm, {}).items()]
            if rows:
                rep.table(["defence", "norm", "ε ([0,1] scale)", "robust accuracy"], rows)
                p = m.get("pgd", {}).get(norm, {})
                rep.p(f"PGD {norm}: {p.get('steps')} steps, step size {p.get('step_size')}, {p.get('restarts')} "
                      f"restart(s), random start, {p.get('n')} test images; gradients through the defence: "
                      f"{p.get('defense_grad')}.")
            if (out_dir / f"robust_{norm}.png").is_file():
                rep.img(out_dir / f"robust_{norm}.png", f"Robust accuracy under PGD ({norm})")
        bb = m.get("blackbox", {})
        rows = [[name, r.get("norm"), r.get(f"median_{r.get('norm')}"), r.get("success_rate"), r.get("n")]
                for name, r in bb.items() if isinstance(r, dict)]
        if rows:
            rep.table(["gradient-free attack", "norm", "median perturbation ([0,1] scale)", "success rate", "images"], rows)
        for cls, d in m.get("distal", {}).items():
            rep.p(f"Distal adversarials, class {cls}: mean p(y|x) {d['mean_confidence']:.3f}, mean log p(x) "
                  f"{d['mean_log_px']:.2f} (test data: {d.get('test_data_mean_log_px', float('nan')):.2f}).")
            if (out_dir / f"distal_class{cls}.png").is_file():
                rep.img(out_dir / f"distal_class{cls}.png", f"Distal adversarials for class {cls}")
    return found


def write_robustness_report(out_dir, run_dirs) -> None:
    from .report import Report

    rep = Report("jemtorch robustness report")
    add_robustness_section(rep, run_dirs)
    rep.write(out_dir)


def distal_runs(run_dirs: list, cls: int, n: int = 8, steps: int = 200, step_size: float = 0.01, seed: int = 0,
                device: str = "auto", data_root: Optional[str] = None) -> dict:
    """Distal adversarials for class ``cls`` from each run; one figure with a row per run."""
    import json

    from .data import to_float, to_uint8
    from .evaluate import load_runs
    from .report import _plt

    runs = load_runs(run_dirs, device, data_root)
    c = runs[0].data.num_classes
    if not 0 <= cls < c:
        raise ValueError(f"--class must be in 0..{c - 1}, got {cls}")
    res = {r.name: distal(r.jem, cls, r.data.shape, n, steps, step_size, seed, r.device) for r in runs}
    for r in runs:  # what log p(x) looks like on real data, to read the samples' values against
        with torch.no_grad():
            res[r.name]["data_log_px"] = r.jem.log_px(to_float(r.data.x_test[:500]).to(r.device)).mean().item()
    plt = _plt()
    fig, axes = plt.subplots(len(runs), n, figsize=(1.5 * n, 1.9 * len(runs)), squeeze=False)
    for i, r in enumerate(runs):
        d = res[r.name]
        imgs = to_uint8(d["x"]).permute(0, 2, 3, 1).numpy()
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j].squeeze(-1) if imgs.shape[-1] == 1 else imgs[j], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"p={d['confidence'][j]:.2f}\nlogp={d['log_px'][j]:.1f}", fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        axes[i][0].set_ylabel(f"{r.name}\n(test data\nlogp {d['data_log_px']:.1f})", fontsize=7)
    label = runs[0].data.classes[cls]
    fig.suptitle(f"Distal adversarials for class {cls} ({label}): {steps} signed-gradient steps on log p(y|x) from noise",
                 fontsize=8)
    fig.tight_layout()
    summary = {}
    for r in runs:
        out_dir = r.run_dir / "robustness"
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_dir / f"distal_class{cls}.png", dpi=110)
        d = res[r.name]
        metrics = _load_metrics(out_dir / "metrics.json")
        metrics.setdefault("distal", {})[str(cls)] = {
            "mean_confidence": float(np.mean(d["confidence"])), "mean_log_px": float(np.mean(d["log_px"])),
            "test_data_mean_log_px": d["data_log_px"],
            "confidence": d["confidence"], "log_px": d["log_px"], "steps": steps, "step_size": step_size}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        summary[r.name] = metrics["distal"][str(cls)]
        write_robustness_report(out_dir, [x.run_dir for x in runs])
    plt.close(fig)
    return summary
