"""The run directory: what ``jem train`` writes, and how every other command reads it back.

    RUN/
      config.json          the resolved TrainConfig
      checkpoint.pt        everything needed to resume (model, optimiser, scheduler, buffer, RNG, step, config)
      best.pt              model weights with the best validation accuracy
      metrics.jsonl        one JSON record per line (kind: train | eval | rollback | recovery)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

import torch

from .checkpoint import CheckpointError, load_safe, save_atomic
from .config import TrainConfig
from .data import ImageData, labeled_subset, load_dataset, training_splits
from .energy import JEM
from .models import create_model
from .models.registry import check_logits
from .sampler import JEMSampler, build_sampler

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
        return self.checkpoint.exists() or (self.path / METRICS).exists()

    def write_config(self, cfg: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    def read_config(self) -> dict:
        return json.loads((self.path / CONFIG).read_text())

    def write_summary(self, summary: dict) -> None:
        (self.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")

    def read_json(self, name: str) -> dict:
        """A JSON file of the run (``summary.json``, ``eval/metrics.json``, ...), or {} when absent."""
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else {}

    def save_checkpoint(self, state: dict) -> Path:
        return save_atomic(state, self.checkpoint)

    def save_best(self, state: dict) -> Path:
        return save_atomic(state, self.best)

    def remove_train_outputs(self) -> None:
        """``--overwrite``: delete what ``jem train`` wrote, and nothing else."""
        import shutil

        for name in TRAIN_OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / SAMPLES_DIR, ignore_errors=True)
        shutil.rmtree(self.path / TENSORBOARD_DIR, ignore_errors=True)


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

    def __init__(self, path: str | Path, tensorboard: Optional[TensorBoardLog] = None):
        self.path = Path(path)
        self._file: Optional[IO[str]] = None
        self.tensorboard = tensorboard

    def write(self, record: dict) -> None:
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
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (a resumed run continues from its checkpoint's step)."""
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in keep))


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
    ckpt = load_safe(rd.checkpoint, dev)
    datasets = {} if datasets is None else datasets
    key = (cfg.dataset, cfg.data_root)
    if key not in datasets:
        datasets[key] = load_dataset(cfg.dataset, cfg.data_root, download_missing=False)
    data: ImageData = datasets[key]
    jem = build_jem(cfg, data.shape, data.num_classes).to(dev)
    weights = load_safe(rd.best, dev)["model"] if rd.best.is_file() else ckpt["model"]
    try:
        jem.f.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{rd.path}: weights do not match the run's config: {str(e).splitlines()[0]}") from None
    jem.eval()
    buffer = ckpt["buffer"]["data"] if cfg.uses_samples else None
    return LoadedRun(rd.path, cfg, jem, data, buffer, dev, rd.read_json(SUMMARY))


def load_runs(run_dirs, device: str = "auto", data_root: Optional[str] = None,
              datasets: Optional[dict] = None) -> list[LoadedRun]:
    """Several runs, each dataset loaded once."""
    datasets = {} if datasets is None else datasets
    return [load_run(d, device, data_root, datasets) for d in run_dirs]
