"""The run directory: what ``jem train`` writes, and how every other command reads it back.

    RUN/
      config.json          the resolved TrainConfig
      checkpoint.pt        everything needed to resume (model, optimiser, scheduler, buffer, RNG, step, config)
      best.pt              model weights with the best validation accuracy
      metrics.jsonl        one JSON record per line (kind: train | eval | rollback | recovery | resume | time_limit)
      summary.json         test accuracy of the best-validation model, time, iterations, ...
      curves.png           training curves, rewritten every epoch
      tb/                  TensorBoard events (--tensorboard)
      ood_calibration.json OOD thresholds of the weights, written by ``jem score`` / ``jemtorch.load(...).score``
      samples/             replay-buffer grids during training; samples_{uncond,cond}.png: the latest
      eval/                written by ``jem eval``
      robustness/          written by ``jem attack`` and ``jem distal``

Every command finds these files through this module (file names live here only), builds a run's model with
``build_jem`` and loads a trained run with ``load_run``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

import torch

from .checkpoint import CheckpointError, load_safe, save_atomic, write_atomic
from .config import TrainConfig
from .data import ImageData, labeled_subset, load_dataset, training_splits
from .energy import JEM
from .models import create_model
from .models.registry import check_logits
from .sampler import JEMSampler, build_sampler

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
# what `jem train --overwrite` removes: only files jem train itself writes
OOD_CALIBRATION = "ood_calibration.json"  # written by jem score / jemtorch.load (OOD thresholds of the weights)
TRAIN_OUTPUTS = (CHECKPOINT, BEST, METRICS, SUMMARY, CURVES, OOD_CALIBRATION, *LATEST_SAMPLES)


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA device without CUDA is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


def build_jem(cfg: TrainConfig, shape: tuple[int, int, int], num_classes: int) -> JEM:
    """The run's classifier for (C, H, W) images, wrapped as a JEM (the one place a model is built from a config);
    one blank forward pass checks that it returns ``num_classes`` logits."""
    model = create_model(cfg.model, in_channels=shape[0], num_classes=num_classes, norm=cfg.norm, dropout=cfg.dropout)
    check_logits(model, cfg.model, shape, num_classes)
    return JEM(model)


def init_images(cfg: TrainConfig, data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled images a run's initial distribution is fitted on: the whole training set, or in a
    semi-supervised run only its labelled subset (no label of an 'unlabelled' image is ever used)."""
    if cfg.labels_per_class <= 0:
        return data.x_train, data.y_train
    s = training_splits(data, cfg.n_valid, cfg.seed, "cpu")
    lab = labeled_subset(s.y_train, cfg.labels_per_class, cfg.seed)
    return s.x_train[lab], s.y_train[lab]


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

    @property
    def has_run(self) -> bool:
        """Has training started here (a checkpoint or a metrics log)?"""
        return self.checkpoint.exists() or (self.path / METRICS).exists()

    @property
    def is_run_dir(self) -> bool:
        """Is this folder a jemtorch run directory: the marker ``jem train`` writes first, or (runs of jemtorch 0.1,
        before the marker) a config beside a checkpoint?"""
        return (self.path / MARKER).is_file() or ((self.path / CONFIG).is_file() and self.checkpoint.is_file())

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

    def write_config(self, cfg: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / MARKER).is_file():
            (self.path / MARKER).write_text("a jemtorch run directory (jem train writes here; do not store other files)\n")
        write_atomic(self.path / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")

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
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(path), purge_step=start_step or None)
        self.rollbacks = rollbacks

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
            self._file = open(self.path, "a")
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


# ------------------------------------------------------------------------------------------------------------------
# reading trained runs (jem eval, jem attack, jem distal)
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A trained run, ready for inference: config, model (eval mode), replay buffer, dataset."""

    run_dir: Path
    cfg: TrainConfig
    jem: JEM
    data: ImageData
    buffer: Optional[torch.Tensor]
    device: torch.device
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def is_baseline(self) -> bool:
        return not self.cfg.uses_samples

    def sampler(self) -> JEMSampler:
        """The run's sampler as configured (initial distribution fitted on the training images when it needs them)."""
        return build_sampler(self.cfg, self.data.shape, self.data.num_classes, self.device,
                             init_images(self.cfg, self.data))


# entries of config.json that must agree with the config stored inside a checkpoint
IDENTITY = ("dataset", "model", "norm", "labels_per_class")


def checked_state(state, path: Path, cfg: TrainConfig, keys: tuple[str, ...]) -> dict:
    """A loaded checkpoint, checked: a dict with ``keys`` whose stored config names the same dataset and model as
    the run's config.json (a checkpoint copied in from another run is refused instead of evaluated)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a jemtorch checkpoint (it holds a {type(state).__name__})")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a jemtorch checkpoint (no {', '.join(missing)})")
    stored = state.get("config")
    if isinstance(stored, dict):
        other = {k: stored.get(k) for k in IDENTITY if k in stored and stored.get(k) != getattr(cfg, k)}
        if other:
            raise CheckpointError(f"{path} was trained with " + ", ".join(f"{k}={v}" for k, v in other.items()) +
                                  ", but the run's config.json says " +
                                  ", ".join(f"{k}={getattr(cfg, k)}" for k in other) + "; it belongs to another run")
    return state


def load_run(run_dir: str | Path, device: str = "auto", data_root: Optional[str] = None,
             datasets: Optional[dict] = None) -> LoadedRun:
    """A trained run: its config, model (best-validation weights when kept), replay buffer and dataset.

    ``datasets``: a dict shared between calls, so runs on the same dataset and root load it once."""
    rd = RunDir(run_dir)
    if not (rd / CONFIG).is_file() or not rd.checkpoint.is_file():
        raise FileNotFoundError(f"not a run directory: {rd.path} (expected {CONFIG} and {CHECKPOINT} from jem train)")
    cfg_dict = rd.read_config()
    if data_root:
        cfg_dict["data_root"] = data_root
    cfg = TrainConfig.from_dict(cfg_dict)
    dev = pick_device(device)
    ckpt = checked_state(load_safe(rd.checkpoint, dev), rd.checkpoint, cfg, ("model", "buffer") if cfg.uses_samples
                         else ("model",))
    datasets = {} if datasets is None else datasets
    key = (cfg.dataset, cfg.data_root)
    if key not in datasets:
        datasets[key] = load_dataset(cfg.dataset, cfg.data_root, download_missing=False)
    data: ImageData = datasets[key]
    jem = build_jem(cfg, data.shape, data.num_classes).to(dev)
    weights = checked_state(load_safe(rd.best, dev), rd.best, cfg, ("model",))["model"] if rd.best.is_file() else ckpt["model"]
    try:
        jem.f.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{rd.path}: weights do not match the run's config: {str(e).splitlines()[0]}") from None
    bad = [n for n, p in jem.f.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{rd.path}: the weights are not finite ({', '.join(bad[:3])}: NaN or inf); the run "
                              f"diverged, nothing can be measured on it")
    jem.eval()
    buffer = ckpt["buffer"].get("data") if cfg.uses_samples and isinstance(ckpt["buffer"], dict) else None
    if cfg.uses_samples and not isinstance(buffer, torch.Tensor):
        raise CheckpointError(f"{rd.checkpoint} has no replay buffer (not a checkpoint of this run)")
    return LoadedRun(rd.path, cfg, jem, data, buffer, dev, rd.read_json(SUMMARY))


def load_runs(run_dirs, device: str = "auto", data_root: Optional[str] = None,
              datasets: Optional[dict] = None) -> list[LoadedRun]:
    """Several runs, each dataset loaded once."""
    datasets = {} if datasets is None else datasets
    return [load_run(d, device, data_root, datasets) for d in run_dirs]
