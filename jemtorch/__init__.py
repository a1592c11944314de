"""jemtorch: Joint Energy-based Models (Grathwohl et al., ICLR 2020) in PyTorch.

Where things live:
    energy.py     JEM: a classifier's logits read as an energy model (energy, log p(x), log p(y|x))
    sampler.py    SGLD and the persistent replay buffer
    train.py      the training loop (Algorithm 1), checkpoints, run directories
    data.py       datasets by name, on-device batches and augmentation
    models/       model registry: cnn, wrn-<depth>-<width>
    config.py     every training knob (CLI flags = config entries)
    cli.py        the ``jem`` command
"""
from .config import TrainConfig, make_config
from .data import ImageData, load_dataset
from .energy import JEM
from .models import create_model, list_models
from .sampler import JEMSampler, ReplayBuffer, sgld
from .train import Trainer, train

__all__ = ["JEM", "JEMSampler", "ReplayBuffer", "sgld", "Trainer", "train", "TrainConfig", "make_config", "create_model",
           "list_models", "load_dataset", "ImageData"]
__version__ = "0.1.0"
