"""jemtorch: Joint Energy-based Models (Grathwohl et al., ICLR 2020) in PyTorch.

Where things live:
    energy.py     JEM: a classifier's logits read as an energy model (energy, log p(x), log p(y|x))
    objective.py  the JEM loss, a pure function of (model, labelled batch, p(x) batch, samples)
    sampler.py    initial distributions, chain updates (SGLD, clamped, PYLD), the replay buffer, build_sampler
    train.py      the training loop (Algorithm 1): step, divergence recovery, validation, checkpoints
    optim.py      optimisers and the learning-rate schedule
    distributed.py  torchrun / DistributedDataParallel: ranks, the few collectives training uses
    run.py        the run directory: file names, metrics log, building and loading a trained run
    data.py       datasets registered by name (with their presets), splits, on-device batches and augmentation
    models/       model registry: cnn, wrn-<depth>-<width>
    config.py     every training knob (CLI flags = config entries)
    inference.py  using a trained model: ``jemtorch.load``, ``jem score``, ``jem export`` (safetensors + card)
    evaluate.py   ``jem eval``: accuracy, calibration, OOD detection, samples, generation quality
    attacks.py    attack maths: PGD, the SGLD-refinement defence, black-box attacks, distal adversarials
    robustness.py ``jem attack`` / ``jem distal`` on trained runs
    metrics.py    metric functions on arrays (ECE, AUROC, Fréchet distance)
    figures.py    image grids and matplotlib figures;  report.py: markdown/HTML reports
    cli.py        the ``jem`` command
"""
from .build import LoadedRun, load_run
from .config import TrainConfig, make_config
from .data import ImageData, load_dataset
from .energy import JEM
from .inference import Predictor, export, load
from .models import create_model, list_models
from .objective import Weights, jem_loss
from .sampler import JEMSampler, ReplayBuffer, build_sampler, sgld
from .train import Trainer, train

__all__ = ["JEM", "JEMSampler", "ReplayBuffer", "build_sampler", "sgld", "jem_loss", "Weights", "Trainer", "train",
           "TrainConfig", "make_config", "create_model", "list_models", "load_dataset", "ImageData", "LoadedRun",
           "load_run", "load", "export", "Predictor"]
from .version import __version__  # noqa: E402,F401
