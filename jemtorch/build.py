"""Building a run's objects from its configuration: the device, the model, the images its sampler starts from, the
speed settings, and a trained run read back from its directory (``load_run``)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import CheckpointError, load_safe
from .config import TrainConfig
from .data import ImageData, file_digest, labeled_subset, load_dataset, to_float, training_splits
from .detectors import DETECTORS, FIT_VERSION, N_FIT, FittedDetectors
from .energy import JEM, eval_mode, nonfinite_weights
from .models import create_model
from .models.registry import check_logits
from .models.wrn import model_as_written
from .rundir import CHECKPOINT, CONFIG, SUMMARY, RunDir
from .rundir import DETECTORS as DETECTORS_FILE
from .sampler import JEMSampler, build_sampler
from .version import __version__


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA device without CUDA is a one-line error. Every command picks
    its device here (training, a run, an export), so a CPU also gets its subnormals flushed here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    device = torch.device(name)
    flush_subnormals(device)
    return device


def flush_subnormals(device: torch.device) -> None:
    """On the CPU, flush subnormal floats to zero for the rest of the process (as TF32 on CUDA, a process setting):
    a classifier grown over-confident has softmax probabilities below 1.2e-38, which x86 CPUs compute an order of
    magnitude slower — a forward and backward pass of a 10-label Pseudo-Label run's last checkpoint took 0.67 s with
    them, 0.08 s flushed (benchmarks/denormals.py). Values that small are zero to every loss and score here."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def build_jem(cfg: TrainConfig, shape: tuple[int, int, int], num_classes: int,
              written_by: Optional[str] = __version__, trust_code: bool = True) -> JEM:
    """The run's classifier for (C, H, W) images, wrapped as a JEM (the one place a model is built from a config);
    one blank forward pass checks that it returns ``num_classes`` logits. ``written_by``: the jemtorch version that
    trained the weights (None: 0.1, which recorded none), for names whose architecture changed since.
    ``trust_code``: a factory model (user code) may be imported (``models.create_model``)."""
    name = model_as_written(cfg.model, written_by)
    model = create_model(name, in_channels=shape[0], num_classes=num_classes, norm=cfg.norm, dropout=cfg.dropout,
                         trust_code=trust_code)
    check_logits(model, name, shape, num_classes)
    return JEM(model)


def init_images(cfg: TrainConfig, data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled images a run's initial distribution is fitted on: the whole training set, or in a
    semi-supervised run only its labelled subset (no label of an 'unlabelled' image is ever used)."""
    if cfg.labels_per_class <= 0:
        return data.x_train, data.y_train
    s = training_splits(data, cfg.n_valid, cfg.seed, "cpu")
    lab = labeled_subset(s.y_train, cfg.labels_per_class, cfg.seed)
    return s.x_train[lab], s.y_train[lab]



def speed_settings(cfg: TrainConfig, jem: JEM, device: torch.device,
                   shape: tuple[int, int, int]) -> Callable[[], contextlib.AbstractContextManager]:
    """Apply ``--channels-last`` and ``--compile`` to the network, TF32 on CUDA; return the autocast context of
    ``--amp``. A compile that fails is a one-line error here, before training starts."""
    if device.type == "cuda":  # TF32 matmuls/convolutions on Ampere and later (ignored by older GPUs)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.channels_last:
        jem.f.to(memory_format=torch.channels_last)
    if cfg.compile:
        jem.f.compile()  # in place: parameter names, checkpoints and state_dicts stay those of the plain network
        try:
            with eval_mode(jem), torch.no_grad():
                jem.f(torch.zeros(2, *shape, device=device))
        except Exception as e:
            raise ValueError(f"--compile failed on this machine ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); train without it") from None
    if cfg.amp == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


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
    notices: list[str] = field(default_factory=list)  # things a command says about the run on stderr

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def is_baseline(self) -> bool:
        return not self.cfg.uses_samples

    def sampler(self) -> JEMSampler:
        """The run's sampler as configured (initial distribution fitted on the training images when it needs them),
        its chains at the noise the model last trained with (``--px-tail-std`` in a tail that has one)."""
        return build_sampler(self.cfg.as_trained(), self.data.shape, self.data.num_classes, self.device,
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
             datasets: Optional[dict] = None, trust_code: bool = False) -> LoadedRun:
    """A trained run: its config, model (best-validation weights when kept), replay buffer and dataset. A run whose
    model is user code (a factory) loads only with ``trust_code=True``.

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
    jem = build_jem(cfg, data.shape, data.num_classes, ckpt.get("jemtorch_version"), trust_code).to(dev)
    weights = checked_state(load_safe(rd.best, dev), rd.best, cfg, ("model",))["model"] if rd.best.is_file() else ckpt["model"]
    try:
        jem.f.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{rd.path}: weights do not match the run's config: {str(e).splitlines()[0]}") from None
    bad = nonfinite_weights(jem.f)
    if bad:
        raise CheckpointError(f"{rd.path}: the weights are not finite ({', '.join(bad[:3])}: NaN or inf); the run "
                              f"diverged, nothing can be measured on it")
    jem.eval()
    buffer = ckpt["buffer"].get("data") if cfg.uses_samples and isinstance(ckpt["buffer"], dict) else None
    if cfg.uses_samples and not isinstance(buffer, torch.Tensor):
        raise CheckpointError(f"{rd.checkpoint} has no replay buffer (not a checkpoint of this run)")
    return LoadedRun(rd.path, cfg, jem, data, buffer, dev, rd.read_json(SUMMARY))


def load_runs(run_dirs, device: str = "auto", data_root: Optional[str] = None,
              datasets: Optional[dict] = None, trust_code: bool = False) -> list[LoadedRun]:
    """Several runs, each dataset loaded once."""
    datasets = {} if datasets is None else datasets
    return [load_run(d, device, data_root, datasets, trust_code) for d in run_dirs]


def detector_fit_images(cfg: TrainConfig, data: ImageData, n: int = N_FIT) -> tuple[torch.Tensor, torch.Tensor]:
    """The images post-hoc detectors are fitted on: the run's training split as training drew it (no validation or
    test image), only its labelled part in a semi-supervised run, at most ``n`` of them (a choice seeded by the
    run's seed), as uint8 with their labels."""
    s = training_splits(data, cfg.n_valid, cfg.seed, "cpu")
    x, y = s.x_train, s.y_train
    if cfg.labels_per_class > 0:
        lab = labeled_subset(y, cfg.labels_per_class, cfg.seed)
        x, y = x[lab], y[lab]
    if len(x) > n:
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
        x, y = x[pick], y[pick]
    return x, y


def run_detectors(run: LoadedRun, progress: bool = False) -> FittedDetectors:
    """Every detector of ``detectors.py`` fitted on the run's training split (``detector_fit_images``), stored in
    RUN/detectors.safetensors for the weights they belong to (by the weights file's SHA-256) and read back from there
    while the weights stay the same. A run directory that cannot be written is fitted again next time."""
    rd = RunDir(run.run_dir)
    sha = file_digest(rd.weights, "sha256")
    stored = FittedDetectors.load(rd / DETECTORS_FILE, sha) if (rd / DETECTORS_FILE).is_file() else None
    if (stored is not None and set(stored.names) >= set(DETECTORS) and stored.info.get("n_fit") == N_FIT
            and stored.info.get("version") == FIT_VERSION):
        return stored
    x, y = detector_fit_images(run.cfg, run.data)
    dets = FittedDetectors.fit(run.jem, to_float(x), y, progress=progress,
                               where=f"{len(x)} images of the run's training split")
    dets.info["n_fit"] = N_FIT
    try:
        dets.save(rd / DETECTORS_FILE, sha)
    except OSError as e:
        run.notices.append(f"detectors fitted but not stored ({e.strerror or e}); the next evaluation fits them again")
    return dets
