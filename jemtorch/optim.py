"""Optimisers and the learning-rate schedule of a run."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def build_optimizer(cfg, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam (the paper's) or SGD with momentum (JEM++/SADA-JEM), with the config's weight decay."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg, iters_per_epoch: int, total_iters: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at a step: linear warm-up over ``warmup_iters``, then ×``decay_rate`` at each of
    ``decay_epochs`` (the official JEM schedule)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
        epoch = step // iters_per_epoch
        return warm * cfg.decay_rate ** sum(epoch >= e for e in cfg.decay_epochs)

    return factor
