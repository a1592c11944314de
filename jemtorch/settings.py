"""Configuration fields. A setting is a dataclass field that carries its command-line help; each module declares the
settings it reads (``objective.ObjectiveSettings``, ``sampler.SamplerSettings``, ``optim.OptimSettings``) and
``config.TrainConfig`` gathers them into one flat configuration: one ``--flag`` and one config-file entry per field.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, Callable

Need = Callable[[bool, str], None]  # need(condition, message): raise ValueError(message) unless condition


def setting(default: Any, help: str, **metadata) -> Any:
    return field(default=default, metadata={"help": help, **metadata})
