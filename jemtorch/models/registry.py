"""The model registry (kept apart from the package so model modules import it without an import circle).

A model is named either by a registered pattern (``cnn``, ``cnn-<width>``, ``cnn-silu-<width>``,
``wrn-<depth>-<width>``) or by a user's factory, ``package.module:function`` or ``path/to/file.py:function``, called
as ``function(in_channels=C, num_classes=K)`` and expected to return an ``nn.Module`` that maps (B, C, H, W) images
in [−1, 1] to (B, K) logits.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register(prefix: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[prefix] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def is_factory(name: str) -> bool:
    """Is ``name`` a user factory (``module:function``) rather than a registered model name?"""
    return ":" in name


def _import_factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"--model {name!r}: a factory is written package.module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            spec = importlib.util.spec_from_file_location(f"jemtorch_user_model_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            # like `python -m`: modules in the working directory are importable
            cwd = str(Path.cwd())
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(cwd)
    except Exception as e:  # ImportError, SyntaxError, whatever the user's module raises on import
        raise ValueError(f"--model {name!r}: cannot import {module_name}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {name!r}: {module_name} has no callable {attr!r}")
    return factory


class UntrustedCode(ValueError):
    """A model name that would import code nobody said to trust."""


def create_model(name: str, *, in_channels: int, num_classes: int, trust_code: bool = True, **kwargs) -> nn.Module:
    """Build a classifier by name: ``cnn``, ``cnn-<width>``, ``wrn-<depth>-<width>``, or a user factory
    ``package.module:function`` / ``file.py:function`` (called with ``in_channels`` and ``num_classes`` only: the
    factory decides its own normalisation and dropout). A factory is imported only with ``trust_code=True`` (what
    a name typed in one's own code or command line means; a name read from a run or an export made by someone else
    needs the user's word: ``--trust-code``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a name such as cnn-16 or wrn-28-10, got {name!r}")
    if is_factory(name) and not trust_code:
        raise UntrustedCode(f"model {name!r} is user code ({name.rpartition(':')[0]}); jemtorch imports it only if "
                            f"you trust it: pass --trust-code (Python: trust_code=True)")
    if is_factory(name):
        factory = _import_factory(name)
        try:
            model = factory(in_channels=in_channels, num_classes=num_classes)
        except Exception as e:
            raise ValueError(f"--model {name!r}: the factory failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model
    for prefix in sorted(_REGISTRY, key=len, reverse=True):  # the longest name first: wrn-firststride before wrn
        factory = _REGISTRY[prefix]
        if name == prefix or name.startswith(prefix + "-"):
            spec = name[len(prefix) + 1 :]
            return factory(spec, in_channels=in_channels, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; available: cnn, cnn-<width>, cnn-silu-<width>, wrn-<depth>-<width> "
                     f"(e.g. wrn-28-10), or a factory package.module:function")


@torch.no_grad()
def check_logits(model: nn.Module, name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    """One forward pass of two blank images: the model must return (2, num_classes) finite logits."""
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        out = model(torch.zeros(2, *shape, device=device))
    except Exception as e:
        raise ValueError(f"model {name!r} cannot take {tuple(shape)} images: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {name!r} must return logits of shape (batch, {num_classes}); got {got} for a batch "
                         f"of 2 {tuple(shape)} images")
