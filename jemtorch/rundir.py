"""The run directory: what ``jem train`` writes, and how every command finds it (file names live here only).

    RUN/
      .jemtorch-run        marker written first: the folder is a run directory
      config.json          the resolved TrainConfig (reusable with --config)
      config_sources.json  where each value of config.json came from (default, recipe, preset, file, flag)
      checkpoint.pt        everything needed to resume (model, optimiser, scheduler, buffer, RNG, step, callbacks)
      best.pt              model weights with the best validation accuracy
      checkpoint-epoch<E>.pt, best-epoch<E>.pt
                           the two as they were after epoch E (--keep-epochs E): a point to branch the run from
      metrics.jsonl        one JSON record per line (kind: train | eval | health | rollback | recovery | resume | time_limit)
      summary.json         test accuracy of the best-validation model, time, iterations, health, ...
      curves.png           training curves, rewritten every epoch
      tb/                  TensorBoard events (--tensorboard)
      ood_calibration.json OOD thresholds of the weights, written by ``jem score`` / ``jemtorch.load(...).score``
      detectors.safetensors post-hoc detectors fitted on the run's training split (``jem eval --detectors``, ``jem score``)
      samples/             replay-buffer grids during training; samples_{uncond,cond}.png: the latest
      eval/                written by ``jem eval``
      robustness/          written by ``jem attack`` and ``jem distal``

Only file I/O lives here; building models and samplers from a run's config is ``build.py``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO, Optional

from .checkpoint import CheckpointError, check_inside, copy_atomic, refuse_link, save_atomic, write_atomic
from .config import TrainConfig

MARKER = ".jemtorch-run"  # written first by jem train: the folder is a run directory
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
TENSORBOARD_DIR = "tb"
SAMPLES_DIR = "samples"
LATEST_SAMPLES = ("samples_uncond.png", "samples_cond.png")
EVAL_DIR = "eval"
ROBUSTNESS_DIR = "robustness"
CONFIG_SOURCES = "config_sources.json"  # where each config value came from
OOD_CALIBRATION = "ood_calibration.json"  # written by jem score / jemtorch.load (OOD thresholds of the weights)
DETECTORS = "detectors.safetensors"  # post-hoc detectors fitted on the run's training split, keyed by the weights' SHA-256
# what `jem train --overwrite` removes: only files jem train itself writes (and what is fitted to its weights)
TRAIN_OUTPUTS = (CHECKPOINT, BEST, METRICS, SUMMARY, CURVES, CONFIG_SOURCES, OOD_CALIBRATION, DETECTORS, *LATEST_SAMPLES)
KEPT = r"(checkpoint|best)-epoch(\d+)\.pt"  # --keep-epochs: checkpoint.pt and best.pt as they were after an epoch


class RunDir:
    """Paths and small file helpers of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def best(self) -> Path:
        return self.path / BEST

    def kept(self, epoch: int) -> tuple[Path, Path]:
        """checkpoint.pt and best.pt as ``--keep-epochs`` kept them after ``epoch``."""
        return self.path / f"checkpoint-epoch{epoch}.pt", self.path / f"best-epoch{epoch}.pt"

    def kept_files(self) -> dict[Path, int]:
        """The copies ``--keep-epochs`` kept here, each with its epoch."""
        found = ((f, re.fullmatch(KEPT, f.name)) for f in self.path.iterdir()) if self.path.is_dir() else ()
        return {f: int(m.group(2)) for f, m in found if m and f.is_file()}

    def keep(self, epoch: int) -> None:
        """Copy checkpoint.pt (just written) and best.pt (if any yet) to their kept names for ``epoch``."""
        for src, dst in zip((self.checkpoint, self.best), self.kept(epoch)):
            if src.is_file():
                copy_atomic(src, dst)
            else:
                dst.unlink(missing_ok=True)

    def branch_from(self, source: RunDir, epoch: int) -> None:
        """Start this (new) run as ``source`` was after ``epoch``: its kept checkpoint and best model, the copies it
        kept up to then (a branch can be branched again), and its metrics log (the resume drops the records after the
        checkpoint's step). ``source`` is only read."""
        pairs = list(zip(source.kept(epoch), (self.checkpoint, self.best))) + [(source / METRICS, self / METRICS)]
        pairs += [(f, self / f.name) for f, e in source.kept_files().items() if e <= epoch]
        for src, dst in pairs:
            if src.is_file():
                copy_atomic(src, dst)

    @property
    def weights(self) -> Path:
        """The file a trained run's model is read from: best.pt when kept, else checkpoint.pt."""
        return self.best if self.best.is_file() else self.checkpoint

    @property
    def has_run(self) -> bool:
        """Has training started here (a checkpoint or a metrics log)?"""
        return self.checkpoint.exists() or (self.path / METRICS).exists()

    @property
    def is_run_dir(self) -> bool:
        """Is this folder a jemtorch run directory: the marker ``jem train`` writes first, or (runs of jemtorch 0.1,
        before the marker) a config beside a checkpoint?"""
        return (self.path / MARKER).is_file() or ((self.path / CONFIG).is_file() and self.checkpoint.is_file())

    def output_dir(self, name: str) -> Path:
        """RUN/<name>, made if missing, checked before anything is written into it: a real folder inside the run
        directory that holds no symbolic link (a run from someone else could point a file of it anywhere)."""
        d = self.path / name
        if d.is_symlink():
            raise CheckpointError(f"refusing to write into {d}: it is a symbolic link (to {os.readlink(d)}); remove it")
        check_inside(self.path, d / "-")
        links = [p for p in d.rglob("*") if p.is_symlink()] if d.is_dir() else []
        if links:
            raise CheckpointError(f"refusing to write into {d}: {links[0]} is a symbolic link; remove it")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def check_links(self) -> None:
        """Before jem train writes: none of the files it writes, nor samples/ or tb/, is a symbolic link."""
        for name in (MARKER, CONFIG, METRICS, *TRAIN_OUTPUTS):
            refuse_link(self.path / name)
        for name in (SAMPLES_DIR, TENSORBOARD_DIR):
            if (self.path / name).exists() or (self.path / name).is_symlink():
                self.output_dir(name)

    def check_new_run(self, overwrite: bool) -> None:
        """Refuse (one line) to start a run where it would replace anything that is not an earlier run's output."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {p} is a file, not a folder")
        if p.is_dir() and any(p.iterdir()) and not self.is_run_dir:
            raise ValueError(f"--out {p} holds files and is not a jemtorch run directory; choose a new or empty "
                             f"folder (nothing was changed)")
        if self.has_run and not overwrite:
            raise ValueError(f"{p} already holds a run; use --resume {p}, --overwrite, or another --out/--name")

    def write_config(self, cfg: TrainConfig, sources: Optional[dict] = None) -> None:
        """config.json (and, when known, config_sources.json: the layer each value came from)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / MARKER).is_file():
            write_atomic(self.path / MARKER, "a jemtorch run directory (jem train writes here; do not store other files)\n")
        write_atomic(self.path / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
        if sources is not None:
            write_atomic(self.path / CONFIG_SOURCES, json.dumps(sources, indent=2) + "\n")

    def read_config(self) -> dict:
        d = self.read_json(CONFIG)
        if not d:
            raise CheckpointError(f"{self.path / CONFIG} is missing or empty")
        return d

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")

    def read_json(self, name: str) -> dict:
        """A JSON object file of the run (``summary.json``, ``eval/metrics.json``, ...), or {} when absent."""
        p = self.path / name
        if not p.is_file():
            return {}
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{p} does not hold a JSON object")
        return d

    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files of checkpoint writes a kill interrupted (``.checkpoint.pt.<pid>.tmp``)."""
        for name in (CHECKPOINT, BEST):
            for tmp in self.path.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    def save_checkpoint(self, state: dict) -> Path:
        return save_atomic(state, self.checkpoint)

    def save_best(self, state: dict) -> Path:
        return save_atomic(state, self.best)

    def remove_train_outputs(self) -> None:
        """``--overwrite``: delete what ``jem train`` wrote, and nothing else (files of other names in ``samples/``
        and ``tb/`` stay, and so do ``eval/`` and ``robustness/``)."""
        for name in TRAIN_OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        for f in self.kept_files():
            f.unlink()
        self.remove_stale_temporaries()
        for folder, pattern in ((SAMPLES_DIR, r"(un)?cond_\d+\.png"), (TENSORBOARD_DIR, r"events\.out\.tfevents\..*")):
            d = self.path / folder
            if d.is_dir():
                for f in d.iterdir():
                    if f.is_file() and re.fullmatch(pattern, f.name):
                        f.unlink()
                if not any(d.iterdir()):
                    d.rmdir()


class TensorBoardLog:
    """The metrics records as TensorBoard scalars (``<kind>/<key>``; rollbacks counted in ``events/rollbacks``, every
    recovery message as text) and sample grids as images, in ``RUN/tb``. A resumed run purges events logged after
    its checkpoint's step, as ``metrics.jsonl`` drops its records."""

    def __init__(self, path: str | Path, start_step: int = 0, rollbacks: int = 0):
        self.check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path), purge_step=start_step or None)
        self.rollbacks = rollbacks

    @staticmethod
    def check_available() -> None:
        """A one-line ValueError unless the tensorboard package imports."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None

    def write(self, record: dict) -> None:
        kind, step = record.get("kind", "train"), int(record["step"])
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        if kind == "rollback":
            self.rollbacks += 1
            self.writer.add_scalar("events/rollbacks", self.rollbacks, step)
        if "message" in record:
            self.writer.add_text(f"events/{kind}", str(record["message"]), step)

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, flushed as written (and mirrored to ``tensorboard`` if given)."""

    def __init__(self, path: str | Path, tensorboard: Optional[TensorBoardLog] = None, enabled: bool = True):
        self.path = Path(path)
        self._file: Optional[IO[str]] = None
        self.tensorboard = tensorboard
        self.enabled = enabled  # False on ranks other than 0: they log nothing

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            refuse_link(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            self._file = os.fdopen(fd, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tensorboard is not None:
            self.tensorboard.close()

    def records(self) -> list[dict]:
        """Every record. A torn last line (a crash in the middle of a write) is dropped; any other line that is not
        JSON is a CheckpointError naming the file and line."""
        if not self.path.exists():
            return []
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        out = []
        for i, ln in enumerate(lines):
            try:
                rec = json.loads(ln)
                if not isinstance(rec, dict) or "step" not in rec:
                    raise ValueError("not a metrics record")
            except ValueError as e:
                if i == len(lines) - 1:
                    break  # torn by a crash mid-write
                raise CheckpointError(f"{self.path}, line {i + 1}: not a metrics record ({e})") from None
            out.append(rec)
        return out

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (a resumed run continues from its checkpoint's step), and a torn last
        line."""
        if self.path.exists():
            keep = [r for r in self.records() if r["step"] <= step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
