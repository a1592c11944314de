"""Checkpoints: one file holds everything needed to resume; written atomically, loaded without unpickling code.

Written with ``torch.save`` to a temporary file in the same folder, fsync'ed, then ``os.replace``d over the old one,
so a crash leaves either the previous checkpoint or the new one, never half a file. Loaded with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain Python containers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    pass


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, fsync, rename: the old file survives any failure, which is reported as
    one-line CheckpointError (disk full, no permission)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a failed write inside its zip writer as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:160]
        raise CheckpointError(f"cannot write {path}: {reason} (disk full or not writable?); "
                              f"{'the previous file is intact' if path.exists() else 'nothing was written'}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_atomic(path: str | Path, text: str) -> Path:
    """A small text file written whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def load_safe(path: str | Path, map_location: Any = "cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, or an object weights_only refuses
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {msg[:200]}") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
