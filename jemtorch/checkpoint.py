"""Files: checkpoints hold everything needed to resume; every file is written atomically and never through a link;
checkpoints load without unpickling code.

Every writer here (``save_atomic``, ``write_atomic``, ``replace_atomic``) writes a temporary file in the target's
folder, fsyncs it, then ``os.replace``s it over the target: a crash leaves the previous file or the new one, never half
a file. A target that is a symbolic link is refused in one line (a run directory from someone else could point
``eval/metrics.json`` at ``~/.bashrc``), and so is a target whose folder leads out of the directory a command names
(``check_inside``). Loaded with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch


class CheckpointError(ValueError):
    pass


def refuse_link(path: Path) -> None:
    """A one-line CheckpointError when ``path`` is a symbolic link (writing would change the file it points to)."""
    if path.is_symlink():
        raise CheckpointError(f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)}); jemtorch "
                              f"writes only real files inside the folder it names: remove the link")


def check_inside(root: str | Path, path: str | Path) -> Path:
    """``path`` itself (not a link), inside ``root`` once its folders' links are followed; a one-line CheckpointError
    otherwise. Returns ``path``."""
    root, path = Path(root), Path(path)
    refuse_link(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders still to be made are made inside it
        folder = folder.parent
    if not folder.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"refusing to write {path}: its folder leads out of {root} (a symbolic link?)")
    return path


def replace_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it over ``path`` (not through a link)."""
    path = Path(path)
    refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix tells writers the format
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """A copy of the file ``src`` at ``dst``, whole or not at all (``replace_atomic``)."""
    return replace_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, fsync, rename: the old file survives any failure, which is reported as
    one-line CheckpointError (disk full, no permission)."""
    path = Path(path)
    refuse_link(path)
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
    refuse_link(path)
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
