"""Optimisers and the learning-rate schedule of a run."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .settings import Need, setting


@dataclass
class OptimSettings:
    """The settings of the optimiser, its learning-rate schedule and the gradient; the JEM paper's by default."""

    optimizer: str = setting("adam", "adam or sgd")
    lr: float = setting(1e-4, "learning rate (paper: Adam 1e-4)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(0.0, "weight decay")
    sam_rho: float = setting(0.0, "sharpness-aware minimisation radius ρ (SADA-JEM: 2 with adaptive SAM); 0: off")
    sam_adaptive: bool = setting(True, "adaptive SAM (ASAM, Kwon et al. 2021), as SADA-JEM uses for ρ ≥ 0.5")
    sam_tail: bool = setting(True, "SAM in the classifier's tail too (past --px-stop-epoch); false: plain optimiser "
                                   "steps there")
    warmup_iters: int = setting(1000, "linear learning-rate warm-up iterations (paper: 1000)")
    schedule: str = setting("step", "learning-rate schedule after warm-up: step (×decay-rate at --decay-epochs; the "
                                    "papers') or cosine (to 0 at the last iteration)")
    decay_epochs: tuple = setting((), "epochs at which the learning rate is multiplied by --decay-rate (paper: 160 180)")
    decay_rate: float = setting(0.3, "learning-rate decay factor")
    clip_grad: float = setting(0.0, "clip the gradient norm to this value (0: off)")
    ema_decay: float = setting(0.0, "keep an exponential moving average of the weights, θ̄ ← d·θ̄ + (1 − d)·θ after "
                                    "every applied step (Polyak averaging; it remembers ~1/(1 − d) steps): "
                                    "validation, best.pt and so every evaluation use the average, checkpoint.pt keeps "
                                    "both; 0: off")

    def check(self, need: Need) -> None:
        need(self.optimizer in ("adam", "sgd"), f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.momentum >= 0, f"--momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.sam_rho >= 0, f"--sam-rho must be >= 0, got {self.sam_rho}")
        need(self.warmup_iters >= 0, f"--warmup-iters must be >= 0, got {self.warmup_iters}")
        need(self.schedule in ("step", "cosine"), f"--schedule must be step or cosine, got {self.schedule!r}")
        need(self.decay_rate > 0, f"--decay-rate must be > 0, got {self.decay_rate}")
        need(self.clip_grad >= 0, f"--clip-grad must be >= 0 (0: off), got {self.clip_grad}")
        need(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1) (0: off), got {self.ema_decay}")


def build_optimizer(cfg, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam (the paper's) or SGD with momentum (JEM++/SADA-JEM), with the config's weight decay."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg, iters_per_epoch: int, total_iters: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at a step: linear warm-up over ``warmup_iters``, then either ×``decay_rate`` at each
    of ``decay_epochs`` (``schedule=step``, the official JEM/JEM++/SADA-JEM schedule) or a cosine decay to 0 over the
    remaining iterations (``schedule=cosine``: short runs end at a low lr without hand-placed decay epochs)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
        if cfg.schedule == "cosine":
            span = max(1, total_iters - cfg.warmup_iters)
            progress = min(1.0, max(0, step - cfg.warmup_iters) / span)
            return warm * 0.5 * (1 + math.cos(math.pi * progress))
        epoch = step // iters_per_epoch
        return warm * cfg.decay_rate ** sum(epoch >= e for e in cfg.decay_epochs)

    return factor


class SAM:
    """Sharpness-aware minimisation around a base optimiser (Foret et al. 2021; adaptive: Kwon et al. 2021), as used
    by SADA-JEM (sndnyang/SADAJEM ``sam.py``, ρ=2, adaptive for ρ ≥ 0.5).

    Usage per step: loss.backward(); ``first_step()`` moves the weights to w + e(w) (the sharpest nearby point within
    radius ρ); recompute the loss there and backward; ``second_step()`` restores w and lets the base optimiser step
    with the gradient from w + e(w).
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 2.0, adaptive: bool = True):
        if rho <= 0:
            raise ValueError(f"SAM needs rho > 0, got {rho}")
        self.base, self.rho, self.adaptive = base, rho, adaptive
        self._e: dict[torch.nn.Parameter, torch.Tensor] = {}

    @property
    def param_groups(self):
        return self.base.param_groups

    def _params(self):
        return [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self) -> None:
        params = self._params()
        scaled = [(p.abs() * p.grad if self.adaptive else p.grad) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled])) if scaled else 0
        scale = self.rho / (norm + 1e-12)
        self._e = {}
        for p in params:
            e = (p.pow(2) if self.adaptive else 1.0) * p.grad * scale
            p.add_(e)
            self._e[p] = e
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self) -> None:
        for p, e in self._e.items():
            p.sub_(e)
        self._e = {}
        self.base.step()

    def restore(self) -> None:
        """Undo a first step without stepping (used when the second loss turns out non-finite)."""
        with torch.no_grad():
            for p, e in self._e.items():
                p.sub_(e)
        self._e = {}
