"""Models by name, timm-style: ``create_model("wrn-28-10", in_channels=3, num_classes=10, norm=None)``.

Each architecture registers a factory under a name pattern. Add one with ``@register("mynet")``; the factory gets
the part of the name after the pattern's prefix (e.g. ``wrn-28-10`` → ``"28-10"``) and the keyword arguments.
"""
from __future__ import annotations

from . import cnn, wrn  # noqa: F401  (importing them registers the models)
from .registry import create_model, list_models, register

__all__ = ["create_model", "list_models", "register"]
