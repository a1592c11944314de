"""The model registry (kept apart from the package so model modules import it without an import circle)."""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register(prefix: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[prefix] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, *, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a classifier by name: ``cnn``, ``cnn-<width>``, ``wrn-<depth>-<width>``."""
    for prefix, factory in _REGISTRY.items():
        if name == prefix or name.startswith(prefix + "-"):
            spec = name[len(prefix) + 1 :]
            return factory(spec, in_channels=in_channels, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; available: cnn, cnn-<width>, wrn-<depth>-<width> (e.g. wrn-28-10)")
