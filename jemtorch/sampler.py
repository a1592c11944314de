"""Sampling from the JEM: an initial distribution, a chain update, and a persistent replay buffer.

    x̂_0 ~ replay buffer (or, with probability ρ, the initial distribution)
    x̂_{t+1} = update(x̂_t, ∇ log p(x̂_t))                       (t < K)
    write x̂_K back to the buffer

Three parts, each chosen by name in the config and built in one place (``build_sampler``):

* initial distribution (``--sgld-init``): ``uniform`` U(−1, 1) (JEM); ``gmm`` one Gaussian per class fitted on the
  training images (JEM++ "informative initialisation"); ``gaussian`` one Gaussian for all images (M-EBM).
* chain update (``--sgld-update``): ``sgld`` x ← x + α∇ + σN(0, I) (JEM); ``clamped`` x ← clip(x + α·clip(∇, −1, 1))
  (SADA-JEM); ``pyld`` full-gradient steps refined by cheap proximal inner steps through the first layer (JEM++).
* the replay buffer, class-conditional or not.

The buffer lives on the training device; nothing crosses to the host during sampling.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_safe, save_atomic
from .data import to_float
from .energy import JEM
from .settings import Need, setting

LogDensity = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def frozen(module: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """``requires_grad=False`` on all parameters (samplers differentiate w.r.t. the input only) and the module in
    ``mode``: ``eval``, or ``train`` — normalisation layers use the batch's statistics (JEM++/SADA-JEM sample with
    BatchNorm in train mode) while their running averages stay untouched."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.train(mode == "train")
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        with (running_stats_frozen(module) if mode == "train" else contextlib.nullcontext()):
            yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep normalising with batch statistics but do not update their running averages."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 − 0)·running + 0·batch
    try:
        yield
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom


# ------------------------------------------------------------------------------------------------------------------
# chain updates
# ------------------------------------------------------------------------------------------------------------------
def sgld(
    log_density: LogDensity,
    x: torch.Tensor,
    n_steps: int,
    step_size: float = 1.0,
    noise: float = 0.01,
    callback: Optional[Callable[[int], None]] = None,
    clamp: Optional[tuple[float, float]] = None,
    record: Optional[dict] = None,
    grad_clip: Optional[float] = None,
    step_cap: Optional[float] = None,
    cap_noise: bool = False,
) -> torch.Tensor:
    """Run ``n_steps`` of x ← x + step_size·∇ log_density(x) + noise·N(0, I); returns a detached tensor.

    ``clamp=(lo, hi)`` projects x back into [lo, hi] after every step (keeps chains in the image domain).
    ``record``: a dict that receives ``grad_norm``, the mean per-chain ‖∇ log_density‖ at the last step, and
    ``step``, the step size the last step took (tensors).
    ``grad_clip=c`` clips every gradient entry to [−c, c] before the step (SADA-JEM's update).
    ``step_cap=m`` lowers the step size, one value for the whole batch at each step, so that the gradient move
    step_size·∇ has an RMS over the batch's entries of at most m: the chains keep the pace they were tuned for when
    the energy steepens (gradient-norm clipping, applied to the chains' input gradient).
    ``cap_noise``: where the cap lowers the step, lower the noise with it (``capped_noise``).

    ``log_density`` maps a batch to per-sample (unnormalised) log densities, shape (B,). With
    step_size = noise²/2 this is exact Langevin dynamics; JEM uses the paper's decoupled values (α=1, σ=0.01).
    """
    x = x.detach().clone().requires_grad_(True)
    for t in range(n_steps):
        (grad,) = torch.autograd.grad(log_density(x).sum(), x)
        with torch.no_grad():
            last = record is not None and t == n_steps - 1
            if last:  # the gradient itself, before any clipping
                record["grad_norm"] = grad.flatten(1).norm(dim=1).mean()
            if grad_clip is not None:
                grad.clamp_(-grad_clip, grad_clip)
            step = capped_step(step_size, step_cap, grad)
            if last:
                record["step"] = step
            x.add_(grad * step)
            if noise > 0:
                x.add_(torch.randn_like(x) * capped_noise(noise, step, step_size, cap_noise and step_cap is not None))
            if clamp is not None:
                x.clamp_(*clamp)
        if callback is not None:
            callback(t)
    return x.detach()


def capped_step(step_size: float, step_cap: Optional[float], grad: torch.Tensor,
                per_sample: bool = False) -> torch.Tensor:
    """The step size a chain step takes: ``step_size``, lowered under ``step_cap=m`` so that step·``grad`` has an RMS
    over all its entries of at most m (a 0-d tensor, no host sync; not differentiated). ``per_sample``: one step per
    sample instead, each lowered by its own RMS (shape (N, 1, ..., 1), broadcasting against ``grad``)."""
    step = torch.as_tensor(step_size, dtype=grad.dtype, device=grad.device)
    if step_cap is None:
        return step
    g = grad.detach()
    rms = g.flatten(1).pow(2).mean(1).view(-1, *([1] * (g.dim() - 1))) if per_sample else g.pow(2).mean()
    return torch.minimum(step, step_cap / rms.sqrt().clamp_min(1e-12))


def capped_noise(noise: float, step: torch.Tensor, step_size: float, follow: bool) -> torch.Tensor | float:
    """The noise σ a chain step adds: ``noise``, or, with ``follow``, ``noise``·√(step/step_size): lowered with the
    step the cap left, so that the chains' Langevin temperature σ²/(2·step) stays the one they were tuned at
    (a cap that shortens the step and keeps σ heats the chains by step_size/step)."""
    if not follow or step_size <= 0:
        return noise
    return noise * (step / step_size).sqrt()


class ChainUpdate(Protocol):
    """Moves a batch of chains ``n_steps`` along ``log_density``; returns detached chains."""

    def run(self, jem: JEM, log_density: LogDensity, x: torch.Tensor, n_steps: int,
            callback: Optional[Callable[[int], None]] = None) -> torch.Tensor: ...


class SGLD:
    """The paper's update: x ← x + α ∇ log p(x) + σ ε (Grathwohl et al. 2020, Algorithm 1: α=1, σ=0.01)."""

    def __init__(self, step_size: float = 1.0, noise: float = 0.01, clamp: bool = False, step_cap: float = 0.0,
                 cap_noise: bool = False):
        self.step_size, self.noise, self.step_cap, self.cap_noise = step_size, noise, step_cap or None, cap_noise
        self.clamp = (-1.0, 1.0) if clamp else None
        self.record: dict = {}

    def run(self, jem, log_density, x, n_steps, callback=None):
        return sgld(log_density, x, n_steps, self.step_size, self.noise, callback, self.clamp, self.record,
                    step_cap=self.step_cap, cap_noise=self.cap_noise)


class ClampedGradient:
    """SADA-JEM's update (sndnyang/SADAJEM ``train_sadajem.py``, ``sample_q``):
    x ← clip(x + α·clip(∇ log p(x), −1, 1) + σ ε, −1, 1), with α=1, σ=0 in ``scripts/sadajem_cifar10.sh``."""

    def __init__(self, step_size: float = 1.0, noise: float = 0.0, step_cap: float = 0.0, cap_noise: bool = False):
        self.step_size, self.noise, self.step_cap, self.cap_noise = step_size, noise, step_cap or None, cap_noise
        self.record: dict = {}

    def run(self, jem, log_density, x, n_steps, callback=None):
        return sgld(log_density, x, n_steps, self.step_size, self.noise, callback, (-1.0, 1.0), self.record,
                    grad_clip=1.0, step_cap=self.step_cap, cap_noise=self.cap_noise)


def first_layer(module: nn.Module) -> nn.Module:
    """The first convolution or linear layer in ``module``'s registration order (PYLD's "layer one")."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return m
    raise ValueError("PYLD needs a model whose first layer is an nn.Conv2d or nn.Linear")


class _FirstLayerFeed:
    """A forward hook, registered once on a layer, that makes the layer return ``z`` instead of its output while ``z``
    is set (PYLD feeds the first layer's output in as a leaf tensor; unset, the layer is untouched)."""

    def __init__(self):
        self.z: Optional[torch.Tensor] = None

    def __call__(self, module, inputs, output):
        return output if self.z is None else self.z

    @classmethod
    def on(cls, layer: nn.Module) -> _FirstLayerFeed:
        feed = layer.__dict__.get("_jemtorch_feed")
        if feed is None:
            feed = layer.__dict__["_jemtorch_feed"] = cls()
            layer.register_forward_hook(feed)
        return feed


class PYLD:
    """JEM++'s Proximal YOPO-based Langevin dynamics (sndnyang/JEMPP ``train_jempp.py``, ``sample_q``).

    Each of the ``n_steps`` outer steps makes one full forward/backward pass, which gives ∇ₓ log p(x) and
    p = ∂ log p(x)/∂z at the first layer's output z = layer₁(x). The chain takes the full-gradient step
    x ← x + α∇, then ``inner_steps`` cheap proximal steps through the first layer only:
    x ← clip(x + η·clip(∇ₓ ⟨layer₁(x), p⟩, −ε, ε), −1, 1). Values from ``scripts/jempp_cifar10.sh``: 5 outer and
    5 inner steps, α=1, η=0.2, ε=1, noise 0.

    Differs from the official code: the first layer is found by module order (the official YOPO WRN names it
    ``layer_one``) and must be applied once per forward pass; its output z is computed outside the network and fed
    in as a leaf (a forward hook), so that p exists under ``--compile`` too, and ∇ₓ = Jᵀp (plus any gradient of a
    direct use of x) — the same numbers; the official final ``(-H).backward()``, whose parameter gradients its caller
    discards with ``zero_grad``, is not made.
    """

    def __init__(self, step_size: float = 1.0, inner_steps: int = 5, inner_lr: float = 0.2, inner_eps: float = 1.0,
                 noise: float = 0.0):
        self.step_size, self.inner_steps, self.inner_lr, self.inner_eps, self.noise = (
            step_size, inner_steps, inner_lr, inner_eps, noise)
        self.record: dict = {}

    def run(self, jem, log_density, x, n_steps, callback=None):
        layer = first_layer(jem)
        feed = _FirstLayerFeed.on(layer)
        x = x.detach().clone()
        for t in range(n_steps):
            # z = layer₁(x) is computed here and fed to the network as a leaf, so p = ∂ log p(x)/∂z exists even
            # when the network is compiled (a compiled graph does not hand out its intermediate tensors)
            x.requires_grad_(True)
            z = layer(x)
            feed.z = z_leaf = z.detach().requires_grad_(True)
            try:
                logp = log_density(x).sum()
            finally:
                feed.z = None
            direct, p = torch.autograd.grad(logp, [x, z_leaf], allow_unused=True)
            (grad_x,) = torch.autograd.grad(z, x, p)  # ∇ₓ = Jᵀp through the first layer (+ any direct use of x)
            if direct is not None:
                grad_x = grad_x + direct
            if t == n_steps - 1:
                self.record["grad_norm"] = grad_x.flatten(1).norm(dim=1).mean().detach()
            with torch.no_grad():
                x = x + self.step_size * grad_x
            for _ in range(self.inner_steps):
                x = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad((layer(x) * p).sum(), x)
                with torch.no_grad():
                    x = (x + self.inner_lr * g.clamp(-self.inner_eps, self.inner_eps)).clamp(-1, 1)
            with torch.no_grad():
                if self.inner_steps == 0:
                    x = x.clamp(-1, 1)
                if self.noise > 0:
                    x = x + self.noise * torch.randn_like(x)
            x = x.detach()
            if callback is not None:
                callback(t)
        return x.detach()


# ------------------------------------------------------------------------------------------------------------------
# initial distributions
# ------------------------------------------------------------------------------------------------------------------
class InitialDistribution(Protocol):
    """Where chains start. ``sample(n, y)`` returns (n, *shape) on the buffer's device; ``y`` picks classes where
    the distribution has them."""

    def sample(self, n: int, y: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class Uniform:
    """U(−1, 1) pixels: the paper's initial distribution."""

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu"):
        self.shape, self.device = tuple(shape), torch.device(device)

    def sample(self, n: int, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.rand((n, *self.shape), device=self.device) * 2 - 1


class Gaussians:
    """One full-covariance Gaussian per class (JEM++'s informative initialisation; one class: M-EBM's), fitted on
    training images in [−1, 1]. Samples are clipped to [−1, 1].

    N(μ_c, Σ_c + 1e-4·I) as in sndnyang/JEMPP ``init_from_centers``. Images larger than ``max_side`` px are
    block-averaged to at most that size before fitting (a 64×64×3 covariance alone would be 453 MB) and samples are
    upsampled back by repetition. Drawn class by class, so memory stays at one Cholesky factor per class.
    """

    def __init__(self, mean: torch.Tensor, chol: torch.Tensor, shape: Sequence[int], block: int = 1):
        self.mean, self.chol, self.shape, self.block = mean, chol, tuple(shape), block
        self.num_classes = len(mean)

    @classmethod
    def fit(cls, x: torch.Tensor, y: Optional[torch.Tensor], num_classes: int, device: torch.device | str = "cpu",
            max_side: int = 32, jitter: float = 1e-4) -> Gaussians:
        """``x``: float images (N, C, H, W) in [−1, 1]; ``y``: labels, or None for one Gaussian over all images."""
        shape = tuple(x.shape[1:])
        block = max(1, -(-max(shape[1:]) // max_side))
        xs = F.avg_pool2d(x, block, ceil_mode=True) if block > 1 else x
        flat = xs.flatten(1).double()
        d = flat.shape[1]
        groups = range(num_classes) if y is not None else [0]
        means, chols = [], []
        eye = torch.eye(d, dtype=torch.float64)
        for c in groups:
            xc = flat[y == c] if y is not None else flat
            if len(xc) < 2:
                raise ValueError(f"cannot fit the initial Gaussian of class {c}: fewer than 2 training images")
            mu = xc.mean(0)
            centred = xc - mu
            cov = centred.T @ centred / len(xc)  # as the official code: the biased (1/n) covariance
            means.append(mu.float())
            chols.append(torch.linalg.cholesky(cov + jitter * eye).float())
        dev = torch.device(device)
        return cls(torch.stack(means).to(dev), torch.stack(chols).to(dev), shape, block)

    def sample(self, n: int, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        dev = self.mean.device
        if self.num_classes == 1:
            y = torch.zeros(n, dtype=torch.long, device=dev)
        elif y is None:
            y = torch.randint(0, self.num_classes, (n,), device=dev)  # JEM++: each reinit draws a random class
        y = y.to(dev)
        d = self.mean.shape[1]
        z = torch.randn(n, d, device=dev)
        out = torch.empty(n, d, device=dev)
        for c in torch.unique(y).tolist():
            m = y == c
            out[m] = self.mean[c] + z[m] @ self.chol[c].T
        c, h, w = self.shape
        hb, wb = -(-h // self.block), -(-w // self.block)
        out = out.view(n, c, hb, wb)
        if self.block > 1:
            out = out.repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)[:, :, :h, :w]
        return out.clamp_(-1, 1).contiguous()

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "chol": self.chol.cpu(), "shape": list(self.shape), "block": self.block}


def fit_gaussians_cached(x_u8: torch.Tensor, y: Optional[torch.Tensor], num_classes: int,
                         device: torch.device | str = "cpu") -> Gaussians:
    """``Gaussians.fit`` on uint8 images, cached under ``$JEMTORCH_CACHE`` by a hash of the images and labels (the
    fit takes seconds for 32×32×3; the cache is keyed by content, so it can never serve another dataset's fit)."""
    h = hashlib.sha1(x_u8.cpu().numpy().tobytes())
    if y is not None:
        h.update(y.cpu().numpy().tobytes())
    cache_dir = Path(os.environ.get("JEMTORCH_CACHE", Path.home() / ".cache" / "jemtorch"))
    path = cache_dir / f"gaussians-{num_classes if y is not None else 1}-{h.hexdigest()[:20]}.pt"
    if path.is_file():
        try:
            s = load_safe(path, device)
            g = Gaussians(s["mean"].to(device), s["chol"].to(device), s["shape"], s["block"])
            if not (torch.isfinite(g.mean).all() and torch.isfinite(g.chol).all()) or len(g.mean) != (
                    num_classes if y is not None else 1) or tuple(g.shape) != tuple(x_u8.shape[1:]):
                raise ValueError("not finite, or fitted to other images")
            return g
        except Exception as e:  # damaged or poisoned: fitted again, and said so
            print(f"jemtorch: the cached initial distribution {path} is damaged ({type(e).__name__}: "
                  f"{str(e)[:80]}); fitting it again", file=sys.stderr)
    g = Gaussians.fit(to_float(x_u8.cpu()), y.cpu() if y is not None else None, num_classes, device)
    try:
        save_atomic(g.state_dict(), path)
    except OSError:
        pass  # a read-only cache only costs time next run
    return g


# ------------------------------------------------------------------------------------------------------------------
# replay buffer and sampler
# ------------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Persistent chains, stored as one tensor on the training device.

    With ``class_conditional=True`` the buffer is split into ``num_classes`` equal slices and a request for labels ``y``
    draws from slice y (the official code's ``sample_p_0`` with ``y``), so chains stay class-conditional. The buffer
    starts as draws from ``init`` (class by class, ``size / num_classes`` each, when ``init`` has classes).
    """

    def __init__(
        self,
        size: int,
        shape: Sequence[int],
        num_classes: int = 1,
        reinit_freq: float = 0.05,
        class_conditional: bool = False,
        device: torch.device | str = "cpu",
        init: Optional[InitialDistribution] = None,
    ):
        if size < 1:
            raise ValueError(f"buffer size must be >= 1, got {size}")
        if not 0.0 <= reinit_freq <= 1.0:
            raise ValueError(f"reinit frequency must be in [0, 1], got {reinit_freq}")
        if class_conditional and size < num_classes:
            raise ValueError(f"class-conditional buffer needs size >= num_classes ({num_classes}), got {size}")
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.reinit_freq = reinit_freq
        self.class_conditional = class_conditional
        self.device = torch.device(device)
        self.init = init if init is not None else Uniform(self.shape, self.device)
        self.data = self.initial(size)

    def __len__(self) -> int:
        return len(self.data)

    def initial(self, n: int) -> torch.Tensor:
        """``n`` chains from the initial distribution; with classes, in equal class slices (class 0 first)."""
        if isinstance(self.init, Gaussians) and self.init.num_classes > 1:
            per = n // self.num_classes
            y = torch.arange(self.num_classes, device=self.device).repeat_interleave(per)
            y = torch.cat([y, torch.randint(0, self.num_classes, (n - len(y),), device=self.device)])
            return self.init.sample(n, y)
        return self.init.sample(n)

    def class_of_slot(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """The class a buffer slot belongs to (class-conditional buffers), else None."""
        if not self.class_conditional:
            return None
        return (idx // (len(self) // self.num_classes)).clamp(max=self.num_classes - 1)

    def sample(self, batch_size: int, y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw starting points: (x0, buffer indices). A fraction ρ restarts from the initial distribution."""
        if self.class_conditional and y is not None:
            per_class = len(self) // self.num_classes
            idx = y.to(self.device) * per_class + torch.randint(0, per_class, (batch_size,), device=self.device)
        else:
            idx = torch.randint(0, len(self), (batch_size,), device=self.device)
        x0 = self.data[idx]
        reinit = torch.rand(batch_size, device=self.device) < self.reinit_freq
        fresh = self.init.sample(batch_size, self.class_of_slot(idx))
        x0 = torch.where(reinit.view(-1, *[1] * len(self.shape)), fresh, x0)
        return x0, idx

    def refresh(self, fraction: float, generator: Optional[torch.Generator] = None) -> int:
        """Restart a random ``fraction`` of the chains from the initial distribution (recovery); returns how many."""
        n = int(round(fraction * len(self)))
        if n <= 0:
            return 0
        idx = torch.randperm(len(self), generator=generator)[:n].to(self.device)
        self.data[idx] = self.init.sample(n, self.class_of_slot(idx))
        return n

    def update(self, idx: torch.Tensor, x: torch.Tensor) -> None:
        self.data[idx] = x.detach().to(self.data.dtype)

    def state_dict(self) -> dict:
        return {"data": self.data}

    def load_state_dict(self, state: dict) -> None:
        data = state["data"]
        if tuple(data.shape[1:]) != self.shape:
            raise ValueError(f"buffer shape {tuple(data.shape[1:])} does not match model input shape {self.shape}")
        self.data = data.to(self.device)


class JEMSampler:
    """Draws JEM samples: buffer → K steps of ``update`` on log p(x) (or log p(x, y) given ``y``) → buffer.

    ``update`` defaults to the paper's SGLD with ``step_size``, ``noise`` and ``clamp``; ``model_mode`` is the mode
    the network is in while sampling (``eval``, or ``train`` for BatchNorm networks as in JEM++/SADA-JEM).
    """

    def __init__(self, buffer: ReplayBuffer, step_size: float = 1.0, noise: float = 0.01, n_steps: int = 20,
                 clamp: bool = False, update: Optional[ChainUpdate] = None, model_mode: str = "eval"):
        if n_steps < 0:
            raise ValueError(f"SGLD steps must be >= 0, got {n_steps}")
        if model_mode not in ("eval", "train"):
            raise ValueError(f"sampling model mode must be eval or train, got {model_mode!r}")
        self.buffer = buffer
        self.update = update if update is not None else SGLD(step_size, noise, clamp)
        self.n_steps = n_steps
        self.model_mode = model_mode
        self.stats: dict[str, torch.Tensor] = {}

    @staticmethod
    def log_density(jem: JEM, y: Optional[torch.Tensor] = None) -> LogDensity:
        if y is None:
            return lambda x: jem.log_px(x)
        return lambda x: jem.log_pxy(x, y)

    def run_chains(self, jem: JEM, x0: torch.Tensor, y: Optional[torch.Tensor] = None,
                   n_steps: Optional[int] = None, callback: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Chains from ``x0`` (no buffer involved): used for fresh samples in eval and the attack defence."""
        with frozen(jem, self.model_mode):
            return self.update.run(jem, self.log_density(jem, y), x0, self.n_steps if n_steps is None else n_steps,
                                   callback)

    @property
    def grad_norm(self) -> Optional[torch.Tensor]:
        """Mean per-chain ‖∇ₓ log p(x)‖ at the last step of the latest chains (a health signal), or None."""
        return getattr(self.update, "record", {}).get("grad_norm")

    def sample(self, jem: JEM, batch_size: int, y: Optional[torch.Tensor] = None,
               n_steps: Optional[int] = None) -> torch.Tensor:
        """Buffer → chains → buffer. ``stats`` then holds the chains' ``travel`` (RMS per-pixel distance from start to
        end), ``saturation`` (share of end pixels at |x| ≥ 0.99) and, under ``--sgld-step-cap``, ``chain_step`` (the
        last step's size), 0-d tensors (health.py reads them)."""
        x0, idx = self.buffer.sample(batch_size, y)
        x = self.run_chains(jem, x0, y, n_steps)
        self.buffer.update(idx, x)
        with torch.no_grad():
            self.stats = {"travel": (x - x0).flatten(1).pow(2).mean(1).sqrt().mean(),
                          "saturation": (x.abs() >= 0.99).float().mean()}
            if getattr(self.update, "step_cap", None) and "step" in self.update.record:
                self.stats["chain_step"] = self.update.record["step"]  # the step size the cap left
        return x


@dataclass
class SamplerSettings:
    """The settings ``build_sampler`` reads (``--sgld-*``, ``--pyld-*``, the buffer); the JEM paper's values by
    default (Algorithm 1 and wgrathwohl/JEM train_wrn_ebm.py: α=1, σ=0.01, K=20, buffer 10 000, ρ=0.05)."""

    sgld_steps: int = setting(20, "chain steps per training iteration K (paper: 20)")
    sgld_steps_max: int = setting(0, "lengthen the chains, one step at a time up to this many, whenever they fall "
                                     "behind the model (reach below 0.45, health.AdaptiveSteps); 0: fixed at "
                                     "--sgld-steps")
    sgld_lr: float = setting(1.0, "chain step size α (paper: 1)")
    sgld_std: float = setting(0.01, "chain noise σ (paper: 0.01)")
    sgld_clamp: bool = setting(False, "clamp SGLD chains to the image range [−1, 1] after every step (paper: no)")
    sgld_step_cap: float = setting(0.0, "lower the chain step size whenever α·∇ would move the chains by more than "
                                        "this RMS per pixel (one value per batch and step), so chains keep their "
                                        "pace as the energy steepens, e.g. in a --px-stop-epoch tail; 0: off")
    sgld_cap_noise: bool = setting(False, "where --sgld-step-cap lowers a step, lower the chain noise with it, "
                                          "σ·√(step/α), so the chains keep their temperature σ²/2α instead of "
                                          "heating up as the energy steepens (off: σ stays, as measured so far)")
    sample_step_cap: float = setting(0.0, "step cap of the fresh chains drawn from the trained model (jem eval's "
                                          "samples and Fréchet distances; jem eval --sample-step-cap overrides it), "
                                          "never read in training; 0: --sgld-step-cap")
    sgld_update: str = setting("sgld", "chain update: sgld (paper), clamped (SADA-JEM: clip(x + α·clip(∇, −1, 1))), "
                                       "pyld (JEM++: proximal inner steps through the first layer)")
    sgld_init: str = setting("uniform", "initial distribution of chains: uniform (paper), gmm (JEM++: one Gaussian "
                                        "per class fitted on the training images), gaussian (M-EBM: one Gaussian)")
    sample_mode: str = setting("eval", "network mode while sampling: eval, or train (BatchNorm uses batch "
                                       "statistics, as JEM++/SADA-JEM; running averages untouched)")
    pyld_inner_steps: int = setting(5, "PYLD inner proximal steps per outer step (JEM++ script: 5)")
    pyld_lr: float = setting(0.2, "PYLD inner step size (JEM++ script: 0.2)")
    pyld_eps: float = setting(1.0, "PYLD inner gradient clip (JEM++: 1)")
    buffer_size: int = setting(10000, "replay buffer size (paper: 10000)")
    reinit_freq: float = setting(0.05, "probability ρ of restarting a chain from the initial distribution (paper: 0.05)")
    class_cond_buffer: bool = setting(False, "split the replay buffer by class (implied by --p-x-y-weight > 0 alone)")

    def check(self, need: Need) -> None:
        need(self.sgld_steps >= 0, f"--sgld-steps must be >= 0, got {self.sgld_steps}")
        need(self.sgld_steps_max == 0 or self.sgld_steps_max >= self.sgld_steps,
             f"--sgld-steps-max must be 0 (fixed chains) or >= --sgld-steps ({self.sgld_steps}), got "
             f"{self.sgld_steps_max}")
        need(self.sgld_lr >= 0, f"--sgld-lr must be >= 0, got {self.sgld_lr}")
        need(self.sgld_std >= 0, f"--sgld-std must be >= 0, got {self.sgld_std}")
        need(self.sgld_step_cap >= 0, f"--sgld-step-cap must be >= 0, got {self.sgld_step_cap}")
        need(self.sgld_step_cap == 0 or self.sgld_update != "pyld",
             "--sgld-step-cap applies to --sgld-update sgld and clamped, not pyld")
        need(not self.sgld_cap_noise or self.sgld_step_cap > 0, "--sgld-cap-noise needs --sgld-step-cap")
        need(self.sample_step_cap >= 0, f"--sample-step-cap must be >= 0, got {self.sample_step_cap}")
        need(self.sample_step_cap == 0 or self.sgld_update != "pyld",
             "--sample-step-cap applies to --sgld-update sgld and clamped, not pyld")
        need(1 <= self.buffer_size <= 10_000_000, f"--buffer-size must be in 1..10000000, got {self.buffer_size}")
        need(0 <= self.reinit_freq <= 1, f"--reinit-freq must be in [0, 1], got {self.reinit_freq}")
        need(self.sgld_update in CHAIN_UPDATES,
             f"--sgld-update must be one of {', '.join(CHAIN_UPDATES)}, got {self.sgld_update!r}")
        need(self.sgld_init in INITIAL_DISTRIBUTIONS,
             f"--sgld-init must be one of {', '.join(INITIAL_DISTRIBUTIONS)}, got {self.sgld_init!r}")
        need(self.sample_mode in ("eval", "train"), f"--sample-mode must be eval or train, got {self.sample_mode!r}")
        need(self.pyld_inner_steps >= 0 and self.pyld_lr >= 0 and self.pyld_eps > 0,
             "--pyld-inner-steps, --pyld-lr must be >= 0 and --pyld-eps > 0")


# name → factory(cfg); adding a chain update or an initial distribution is one class and one entry here
CHAIN_UPDATES: dict[str, Callable[..., ChainUpdate]] = {
    "sgld": lambda cfg: SGLD(cfg.sgld_lr, cfg.sgld_std, cfg.sgld_clamp, cfg.sgld_step_cap, cfg.sgld_cap_noise),
    "clamped": lambda cfg: ClampedGradient(cfg.sgld_lr, cfg.sgld_std, cfg.sgld_step_cap, cfg.sgld_cap_noise),
    "pyld": lambda cfg: PYLD(cfg.sgld_lr, cfg.pyld_inner_steps, cfg.pyld_lr, cfg.pyld_eps, cfg.sgld_std),
}
# factory(x_u8, y, num_classes, shape, device) → InitialDistribution; x_u8/y are training images (None: unavailable)
INITIAL_DISTRIBUTIONS: dict[str, Callable[..., InitialDistribution]] = {
    "uniform": lambda x_u8, y, num_classes, shape, device: Uniform(shape, device),
    "gmm": lambda x_u8, y, num_classes, shape, device: fit_gaussians_cached(x_u8, y, num_classes, device),
    "gaussian": lambda x_u8, y, num_classes, shape, device: fit_gaussians_cached(x_u8, None, num_classes, device),
}


def build_sampler(cfg, shape: Sequence[int], num_classes: int, device: torch.device | str,
                  train_images: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None) -> JEMSampler:
    """The sampler a config describes (``sgld_init``, ``sgld_update``, buffer, ``sample_mode``) — the one place
    train, eval and attack build it. ``train_images``: (uint8 images, labels) the Gaussian initial distributions are
    fitted on; without them the chains start from U(−1, 1)."""
    device = torch.device(device)
    init_name = cfg.sgld_init if train_images is not None else "uniform"
    x_u8, y = train_images if train_images is not None else (None, None)
    init = INITIAL_DISTRIBUTIONS[init_name](x_u8, y, num_classes, tuple(shape), device)
    buffer = ReplayBuffer(cfg.buffer_size, shape, num_classes, cfg.reinit_freq, cfg.class_conditional, device, init)
    update = CHAIN_UPDATES[cfg.sgld_update](cfg)
    return JEMSampler(buffer, n_steps=cfg.sgld_steps, update=update, model_mode=cfg.sample_mode)
