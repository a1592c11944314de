"""Attack maths: PGD, the SGLD-refinement defence, gradient-free attacks from maintained libraries, distal
adversarials. Pure functions of models and tensors; ``robustness.py`` runs them on trained runs (``jem attack``,
``jem distal``).

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
* Steepness: the input-gradient scale at test images (∇ₓE, first-order distance to the decision boundary) — no
  attack, the cheap view of what PGD measures.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .energy import JEM, image_norms, in_batches
from .sampler import capped_noise, capped_step, frozen, sgld

SCALE = 2.0  # [0,1]-pixel units → model units
THREAT_MODELS = ("linf", "l2")
DEFAULT_EPS = {"linf": "0,1/255,2/255,4/255,8/255,16/255", "l2": "0,0.25,0.5,1,2"}


def check_threat_model(name: str, flag: str = "--threat-model") -> str:
    """``name`` if it is linf or l2, else a one-line ValueError naming ``flag``."""
    if name not in THREAT_MODELS:
        raise ValueError(f"{flag} must be linf or l2, got {name!r}")
    return name


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
                 grad: str = "full", step_cap: float = 0.0, cap_noise: bool = False):
        super().__init__()
        if grad not in ("full", "bpda"):
            raise ValueError(f"--defense-grad must be full or bpda, got {grad!r}")
        if n_steps < 0 or n_chains < 1:
            raise ValueError("refinement steps must be >= 0 and chains >= 1")
        self.jem, self.n_steps, self.n_chains = jem, n_steps, n_chains
        self.step_size, self.noise, self.grad, self.step_cap = step_size, noise, grad, step_cap or None
        self.cap_noise = cap_noise and self.step_cap is not None

    @property
    def name(self) -> str:
        return "none" if self.n_steps == 0 else f"sgld-{self.n_steps}x{self.n_chains}-{self.grad}"

    def refine(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad == "bpda":
            with torch.enable_grad():  # the chains need ∇ log p(x) also where the caller scores under no_grad
                xs = sgld(self.jem.log_px, x, self.n_steps, self.step_size, self.noise, step_cap=self.step_cap,
                          cap_noise=self.cap_noise)
            return x + (xs - x).detach()  # forward: refined value; backward: identity
        keep_graph = x.requires_grad
        with torch.enable_grad():
            xr = x if keep_graph else x.detach().requires_grad_(True)
            for _ in range(self.n_steps):
                (g,) = torch.autograd.grad(self.jem.log_px(xr).sum(), xr, create_graph=keep_graph)
                step = capped_step(self.step_size, self.step_cap, g)  # sampler.sgld's step, cap included
                noise = capped_noise(self.noise, step, self.step_size, self.cap_noise)
                xr = xr + step * g + noise * torch.randn_like(xr)
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
        delta = delta * (eps / image_norms(delta)).clamp(max=1.0)
    return (x + delta).clamp(-1, 1)


def pgd(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
        steps: int = 20, step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True) -> torch.Tensor:
    """Untargeted PGD on images in [−1, 1]; ``eps`` and ``step_size`` in model units. ``model`` returns log-probs or
    logits. Returns, per image, an adversarial that fools the model in some restart (else the last restart's); an
    image the model already gets wrong is returned as it is — a random start inside the ε-ball must not count as a
    correct, "robust" answer (for a deterministic model robust accuracy never exceeds clean accuracy, as in
    AutoAttack's protocol; the stochastic SGLD-refined model is judged on one clean draw)."""
    check_threat_model(norm, "threat model")
    if eps == 0:
        return x.clone()
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    best = x.clone()
    with torch.no_grad():
        fooled = model(x).argmax(1) != y
    view = (-1, *[1] * (x.dim() - 1))
    for _ in range(restarts):
        if random_start and norm == "linf":
            x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
        elif random_start:
            d = torch.randn_like(x)
            d = d / image_norms(d) * eps * torch.rand(len(x), device=x.device).view(view)
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
                    x_adv = x_adv + step_size * g / image_norms(g)
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
# steepness: how fast the logits change around the data (no attack, two gradients per image)
# ------------------------------------------------------------------------------------------------------------------
def steepness(jem: JEM, x: torch.Tensor, batch_size: int = 250) -> dict:
    """Input-gradient scale of a model at images ``x`` (model units), medians over the images:

    * ``energy_grad_rms``: the RMS per pixel of ∇ₓE(x), E = −LogSumExp f (model units) — what one step of the
      chains moves a pixel by at step size 1;
    * ``boundary_l2``: the first-order L2 distance to the decision boundary, (f₁ − f₂) / ‖∇ₓ(f₁ − f₂)‖₂ with f₁, f₂
      the two largest logits, in [0, 1]-pixel units (ε's units; exact for a linear model) — large for a smooth model,
      which PGD then needs a large ε to flip.
    """
    def per_image(xb: torch.Tensor) -> torch.Tensor:  # (B, 2): RMS ∇ₓE, boundary distance
        xb = xb.requires_grad_(True)
        logits = jem(xb)
        top2 = logits.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        (g_e,) = torch.autograd.grad(-logits.logsumexp(1).sum(), xb, retain_graph=True)
        (g_m,) = torch.autograd.grad(margin.sum(), xb)
        dist = margin.detach() / g_m.flatten(1).norm(dim=1).clamp_min(1e-12) / SCALE
        return torch.stack([g_e.flatten(1).pow(2).mean(1).sqrt(), dist], 1).cpu()

    with frozen(jem):
        med = in_batches(per_image, x, batch_size, next(jem.parameters()).device).median(0).values
    return {"energy_grad_rms": med[0].item(), "boundary_l2": med[1].item(), "n": len(x)}


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
