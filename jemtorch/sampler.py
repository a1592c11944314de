"""SGLD sampling with a persistent replay buffer (Algorithm 1 of Grathwohl et al. 2020).

    x̂_0 ~ buffer (or, with probability ρ, U(-1, 1))
    x̂_{t+1} = x̂_t + α ∂ log p(x̂_t)/∂x̂_t + σ N(0, I)        (t < η)
    write x̂_η back to the buffer

The buffer lives on the training device; nothing crosses to the host during sampling.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .energy import JEM


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on all parameters: SGLD differentiates w.r.t. the input only."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


def sgld(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_steps: int,
    step_size: float = 1.0,
    noise: float = 0.01,
    callback: Optional[Callable[[int], None]] = None,
    clamp: Optional[tuple[float, float]] = None,
) -> torch.Tensor:
    """Run ``n_steps`` of x ← x + step_size·∇ log_density(x) + noise·N(0, I); returns a detached tensor.

    ``clamp=(lo, hi)`` projects x back into [lo, hi] after every step (keeps chains in the image domain).

    ``log_density`` maps a batch to per-sample (unnormalised) log densities, shape (B,). With
    step_size = noise²/2 this is exact Langevin dynamics; JEM uses the paper's decoupled values (α=1, σ=0.01).
    """
    x = x.detach().clone().requires_grad_(True)
    for t in range(n_steps):
        (grad,) = torch.autograd.grad(log_density(x).sum(), x)
        with torch.no_grad():
            x.add_(grad, alpha=step_size)
            if noise > 0:
                x.add_(torch.randn_like(x), alpha=noise)
            if clamp is not None:
                x.clamp_(*clamp)
        if callback is not None:
            callback(t)
    return x.detach()


class ReplayBuffer:
    """Persistent SGLD chains, stored as one tensor on the training device.

    With ``class_conditional=True`` the buffer is split into ``num_classes`` equal slices and a request for labels ``y``
    draws from slice y (the official code's ``sample_p_0`` with ``y``), so chains stay class-conditional.
    """

    def __init__(
        self,
        size: int,
        shape: Sequence[int],
        num_classes: int = 1,
        reinit_freq: float = 0.05,
        class_conditional: bool = False,
        device: torch.device | str = "cpu",
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
        self.data = self.uniform(size)

    def __len__(self) -> int:
        return len(self.data)

    def uniform(self, n: int) -> torch.Tensor:
        """n images from U(-1, 1), the paper's initial distribution."""
        return torch.rand((n, *self.shape), device=self.device) * 2 - 1

    def sample(self, batch_size: int, y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw starting points: (x0, buffer indices). A fraction ρ is replaced by fresh uniform noise."""
        if self.class_conditional and y is not None:
            per_class = len(self) // self.num_classes
            idx = y.to(self.device) * per_class + torch.randint(0, per_class, (batch_size,), device=self.device)
        else:
            idx = torch.randint(0, len(self), (batch_size,), device=self.device)
        x0 = self.data[idx]
        reinit = torch.rand(batch_size, device=self.device) < self.reinit_freq
        x0 = torch.where(reinit.view(-1, *[1] * len(self.shape)), self.uniform(batch_size), x0)
        return x0, idx

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
    """Draws JEM samples: buffer → η SGLD steps on log p(x) (or log p(x, y) given ``y``) → buffer."""

    def __init__(self, buffer: ReplayBuffer, step_size: float = 1.0, noise: float = 0.01, n_steps: int = 20,
                 clamp: bool = False):
        if n_steps < 0:
            raise ValueError(f"SGLD steps must be >= 0, got {n_steps}")
        self.buffer = buffer
        self.clamp = (-1.0, 1.0) if clamp else None
        self.step_size = step_size
        self.noise = noise
        self.n_steps = n_steps

    def log_density(self, jem: JEM, y: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor], torch.Tensor]:
        if y is None:
            return lambda x: jem.log_px(x)
        return lambda x: jem.log_pxy(x, y)

    def sample(self, jem: JEM, batch_size: int, y: Optional[torch.Tensor] = None, n_steps: Optional[int] = None) -> torch.Tensor:
        x0, idx = self.buffer.sample(batch_size, y)
        with frozen(jem):
            x = sgld(self.log_density(jem, y), x0, self.n_steps if n_steps is None else n_steps, self.step_size, self.noise,
                     clamp=self.clamp)
        self.buffer.update(idx, x)
        return x
