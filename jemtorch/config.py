"""Training configuration: one flat dataclass, every field a CLI flag (``--field-name``) and a config-file entry.

The fields are declared in sections by the modules that read them (``objective.ObjectiveSettings``,
``sampler.SamplerSettings``, ``optim.OptimSettings``; run, loop and logging settings here). A value comes from the
last of these layers that sets it (``jem config`` prints each value with its layer; ``jem train`` writes the same into
``RUN/config_sources.json``):

    1. default          the dataclass default: the JEM paper's values (Grathwohl et al. 2020, Algorithm 1)
    2. recipe           one paper's official values (``RECIPES`` below: jem, jempp, sadajem)
    3. preset           the dataset's preset file ``jemtorch/presets/<dataset>.toml``: its ``[all]`` table, then the
                        table of the recipe in use (the file also names the dataset's default recipe)
    4. resumed run      the run's own config.json (``jem train --resume``)
    5. config file      ``--config FILE`` (JSON or TOML); a file may start from another with ``extends = "base.toml"``
                        (a path relative to it): the base's entries first, the file's own over them
    6. flag             the command line (or the keyword arguments of ``make_config``)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Optional

from .objective import ObjectiveSettings
from .optim import OptimSettings
from .sampler import SamplerSettings
from .settings import Need, setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class RunSettings:
    """What to train, where, on what."""

    dataset: str = setting("digits", "dataset name: digits, mnist, fashion-mnist, kmnist, cifar10, cifar100, svhn, "
                                     "imagefolder")
    data_root: str = setting("./data", "folder holding the dataset in torchvision's layout (see README)")
    download: bool = setting(False, "download a missing dataset from its official URL (md5-verified)")
    model: str = setting("wrn-28-10", "model name: cnn, cnn-<width>, cnn-silu-<width>, wrn-<depth>-<width> (paper: wrn-28-10), or your "
                                      "own factory package.module:function or file.py:function (called with "
                                      "in_channels, num_classes; see --trust-code)")
    norm: Optional[str] = setting(None, "normalisation layers (cnn and wrn models): none, batch, instance, layer "
                                        "(paper: none)")
    dropout: float = setting(0.0, "dropout rate in the model")
    recipe: str = setting("jem", "training recipe, every field set to that paper's official values (any can be "
                                 "overridden): jem (Grathwohl et al. 2020), jempp (JEM++, Yang & Ji 2021), sadajem "
                                 "(SADA-JEM, Yang et al. 2023); the dataset's preset picks its default")
    name: Optional[str] = setting(None, "run name; the run directory defaults to runs/<name>")
    out: Optional[str] = setting(None, "run directory (default runs/<name>, name defaults to "
                                       "<dataset>-<model>[-baseline])")
    seed: int = setting(0, "random seed (data order, initialisation, SGLD noise)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N")
    amp: str = setting("none", "mixed precision: none, or bf16 (autocast for the network's forward passes in "
                               "sampling and the loss; chains, loss and weights stay fp32)")
    channels_last: bool = setting(False, "channels-last memory format for the network and its inputs (faster "
                                         "convolutions on recent GPUs)")
    compile: bool = setting(False, "torch.compile the network (needs a working Inductor backend: a C++ compiler on "
                                   "CPU, Triton on GPU)")
    labels_per_class: int = setting(-1, "semi-supervised: keep labels for this many examples per class (-1: all)")

    def check(self, need: Need) -> None:
        need(self.norm in (None, "none", "batch", "instance", "layer"),
             f"--norm must be none, batch, instance or layer, got {self.norm!r}")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        need(self.amp in ("none", "bf16"), f"--amp must be none or bf16, got {self.amp!r}")
        need(self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda"),
             f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(0 <= self.seed < 2**63, f"--seed must be in 0..2**63-1, got {self.seed}")
        need(self.labels_per_class == -1 or self.labels_per_class >= 1,
             f"--labels-per-class must be -1 (all) or >= 1, got {self.labels_per_class}")


@dataclass
class LoopSettings:
    """How long to train, on how much data per step, and when the generative terms join; stability knobs."""

    epochs: int = setting(200, "training epochs (paper: 200 on CIFAR-10)")
    batch_size: int = setting(64, "batch size (data and SGLD samples each; paper: 64)")
    px_batch_size: int = setting(-1, "images and chains per step in the p(x) term when smaller than --batch-size (-1: "
                                     "the batch size, as the papers); the classifier keeps the full batch")
    px_data_batches: int = setting(1, "the p(x) term's data side averages the energy over this many batches of "
                                      "training images (the step's own and independent draws of the training set), "
                                      "its chains stay one batch: the density's gradient changes mostly with the "
                                      "batch (benchmarks/probe_gradients.py), and more data images make it steadier "
                                      "from step to step, for one forward and backward pass per extra batch "
                                      "(docs/results/density.md, 'Gradient surgery'); 1: the papers'")
    px_start_epoch: int = setting(0, "train the classifier alone for this many epochs before the generative terms "
                                     "switch on (0: from the start, as the papers)")
    px_stop_epoch: int = setting(-1, "the generative terms stop at the start of this epoch and the classifier trains "
                                     "alone to the end (a cross-entropy tail that steepens the smooth classifier a "
                                     "healthy density leaves: docs/results/density.md); -1: they run to the end")
    px_tail_scale: float = setting(0.0, "after --px-stop-epoch the generative terms keep training at this share of "
                                        "their weights (and the energy penalty's) instead of stopping; 0: the "
                                        "classifier alone (on Fashion-MNIST 0.1 and 0.3 pinned within ~1 000 "
                                        "iterations: docs/results/density.md)")
    px_tail_std: float = setting(-1.0, "the chains' noise σ in that tail (--px-tail-scale > 0) instead of --sgld-std, "
                                       "and the σ eval, fresh samples and the attack defence sample with: the noise "
                                       "the model last trained with (Fashion-MNIST: noisy chains while the density "
                                       "trains, noise-free ones in the tail: docs/results/density.md); -1: --sgld-std")
    px_fade_epochs: float = setting(0.0, "at --px-stop-epoch lower the generative terms' weights (and the energy "
                                         "penalty's) linearly to --px-tail-scale over this many epochs, fractions "
                                         "allowed, instead of at once (0: a step, as the tail has been measured)")
    px_pause_epochs: float = setting(0.0, "after --px-stop-epoch the classifier trains alone for this many epochs, "
                                          "fractions allowed, before the generative terms return at --px-tail-scale "
                                          "for the rest of the tail: the density retrained at the end on a classifier "
                                          "that caught up (0: no pause; docs/results/density.md)")
    px_tail_grad: str = setting("all", "what the generative terms train after --px-stop-epoch (--px-tail-scale > 0): "
                                       "all (every weight, as before the stop) or logit-shift (only the shift the "
                                       "network's last linear layer adds to every logit, its weights' and bias's "
                                       "common mode: the softmax ignores it, so the classifier's tail trains as with "
                                       "no density (on a network without batch statistics shared with the "
                                       "samples), and the density keeps a linear term in the last features; "
                                       "docs/results/density.md, 'The density on the logits' shift')")
    px_tail_leak: float = setting(0.0, "with --px-tail-grad logit-shift, this share of the rest of the generative "
                                       "terms' gradient still reaches every weight in the tail (0: the shift alone; "
                                       "1: as --px-tail-grad all)")
    px_ramp_epochs: float = setting(0.0, "once the generative terms switch on, raise their weights (and the energy "
                                         "penalty's) linearly from 0 to their values over this many epochs, fractions "
                                         "allowed (0: at once, as the papers)")
    px_target_reach: float = setting(0.0, "adapt the generative terms' scale (≤ 1, the energy penalty's with them) to "
                                          "keep this share of chain ends at the data's energy (reach, health.py): "
                                          "raised fast when the chains fall behind, lowered slowly while they keep "
                                          "up; 0: fixed weights")
    px_scale_min: float = setting(0.1, "the smallest scale --px-target-reach may set")
    data_noise: float = setting(0.03, "std of Gaussian noise added to training images σ_data (paper: 0.03)")
    augment: bool = setting(True, "random crop (reflect pad) and flips where they fit the dataset")
    px_augment: bool = setting(True, "the p(x) term sees augmented data too (paper: yes; SADA-JEM: no, un-augmented "
                                     "images)")
    max_iters: int = setting(-1, "stop after this many iterations (-1: run all epochs)")
    time_limit: float = setting(0.0, "training-time budget in seconds (0: none): stop after the last whole epoch that "
                                     "fits (judged by the longer of the mean and the last epoch), or mid-epoch once "
                                     "the budget is spent; then validate, test and save as at the end. The lr "
                                     "schedule stays the one for --epochs")
    n_valid: int = setting(-1, "held-out validation examples for best-checkpoint selection (-1: 10% of train, 0: none)")
    max_energy_gap: float = setting(200.0, "a step with |E(data) − E(samples)| above this, or a non-finite loss, "
                                           "counts as divergence")
    max_rollbacks: int = setting(20, "recover from at most this many divergences (recovery.py: the ladder), "
                                     "then stop (0: stop at the first divergence)")
    snapshot_every: int = setting(100, "keep an in-memory snapshot of model, optimiser and replay buffer every N "
                                       "healthy iterations")
    snapshots_kept: int = setting(4, "how many snapshots to keep; a repeated divergence steps further back")
    inject_divergence: tuple = setting((), "fault injection for testing recovery: report a divergence at these "
                                           "iterations (each once)")

    def check(self, need: Need) -> None:
        need(1 <= self.epochs <= 1_000_000, f"--epochs must be in 1..1000000, got {self.epochs}")
        need(1 <= self.batch_size <= 1_000_000, f"--batch-size must be in 1..1000000, got {self.batch_size}")
        need(self.px_batch_size == -1 or 1 <= self.px_batch_size <= self.batch_size,
             f"--px-batch-size must be -1 or in 1..--batch-size, got {self.px_batch_size}")
        need(1 <= self.px_data_batches <= 64, f"--px-data-batches must be in 1..64, got {self.px_data_batches}")
        need(self.px_start_epoch >= 0, f"--px-start-epoch must be >= 0, got {self.px_start_epoch}")
        need(self.px_ramp_epochs >= 0, f"--px-ramp-epochs must be >= 0, got {self.px_ramp_epochs}")
        need(self.px_stop_epoch == -1 or self.px_start_epoch < self.px_stop_epoch <= self.epochs,
             f"--px-stop-epoch must be -1 or in --px-start-epoch + 1..--epochs ({self.px_start_epoch + 1}.."
             f"{self.epochs}), got {self.px_stop_epoch}")
        need(0 <= self.px_tail_scale <= 1, f"--px-tail-scale must be in [0, 1], got {self.px_tail_scale}")
        need(self.px_tail_scale == 0 or self.px_stop_epoch >= 0, "--px-tail-scale needs --px-stop-epoch")
        need(self.px_fade_epochs >= 0, f"--px-fade-epochs must be >= 0, got {self.px_fade_epochs}")
        need(self.px_fade_epochs == 0 or self.px_stop_epoch >= 0, "--px-fade-epochs needs --px-stop-epoch")
        need(self.px_pause_epochs >= 0, f"--px-pause-epochs must be >= 0, got {self.px_pause_epochs}")
        need(self.px_pause_epochs == 0 or (self.px_tail_scale > 0 and self.px_fade_epochs == 0),
             "--px-pause-epochs needs --px-tail-scale > 0 (the weight the density returns at) and no --px-fade-epochs")
        need(self.px_pause_epochs == 0 or self.px_stop_epoch + self.px_pause_epochs < self.epochs,
             f"--px-pause-epochs {self.px_pause_epochs} after --px-stop-epoch {self.px_stop_epoch} leaves no epoch of "
             f"the {self.epochs} for the density to return in")
        need(self.px_tail_std == -1 or self.px_tail_std >= 0, f"--px-tail-std must be -1 or >= 0, got {self.px_tail_std}")
        need(self.px_tail_std == -1 or self.px_tail_scale > 0, "--px-tail-std needs --px-tail-scale > 0")
        need(self.px_tail_grad in ("all", "logit-shift"),
             f"--px-tail-grad must be all or logit-shift, got {self.px_tail_grad!r}")
        need(self.px_tail_grad == "all" or self.px_tail_scale > 0, "--px-tail-grad logit-shift needs --px-tail-scale > 0")
        need(0 <= self.px_tail_leak <= 1, f"--px-tail-leak must be in [0, 1], got {self.px_tail_leak}")
        need(self.px_tail_leak == 0 or self.px_tail_grad == "logit-shift", "--px-tail-leak needs --px-tail-grad "
             "logit-shift")
        need(self.px_tail_grad == "all" or not self.grad_surgery, "--px-tail-grad logit-shift and --grad-surgery "
             "are two ways of splitting the gradient: use one")
        need(self.px_tail_grad == "all" or self.sam_rho == 0 or not self.sam_tail,
             "--px-tail-grad logit-shift does not combine with SAM in the tail: add --no-sam-tail or --sam-rho 0")
        need(0 <= self.px_target_reach < 1, f"--px-target-reach must be in [0, 1), got {self.px_target_reach}")
        need(0 < self.px_scale_min <= 1, f"--px-scale-min must be in (0, 1], got {self.px_scale_min}")
        need(self.data_noise >= 0, f"--data-noise must be >= 0, got {self.data_noise}")
        need(self.max_iters >= -1, f"--max-iters must be -1 (no limit) or >= 0, got {self.max_iters}")
        need(self.time_limit >= 0, f"--time-limit must be >= 0 seconds (0: no limit), got {self.time_limit}")
        need(self.n_valid >= -1, f"--n-valid must be -1 (10%) or >= 0, got {self.n_valid}")
        need(self.ema_decay == 0 or self.n_valid != 0, "--ema-decay needs a validation split (best.pt holds the "
             "averaged weights): drop --n-valid 0")
        need(self.max_energy_gap > 0, "--max-energy-gap must be > 0")
        need(self.max_rollbacks >= 0, "--max-rollbacks must be >= 0")
        need(self.snapshot_every >= 1, "--snapshot-every must be >= 1")
        need(self.snapshots_kept >= 1, "--snapshots-kept must be >= 1")


@dataclass
class LogSettings:
    """What is written while training, and how often."""

    log_every: int = setting(20, "write a metrics.jsonl record every N iterations")
    sample_every: int = setting(-1, "write sample grids every N iterations (-1: every 10 epochs and at the end)")
    eval_every: int = setting(1, "evaluate on the validation split every N epochs")
    ckpt_every: int = setting(1, "write the resumable checkpoint every N epochs (and at the end)")
    keep_epochs: str = setting("", "also keep the checkpoint after these epochs (comma-separated, e.g. 8 for a tail "
                                   "from --px-stop-epoch 8) as checkpoint-epoch<E>.pt, and best.pt as "
                                   "best-epoch<E>.pt: points to branch the run from with jem train --resume RUN "
                                   "--from-epoch E --out NEW (each as large as checkpoint.pt)")
    progress: bool = setting(True, "show a progress bar")
    tensorboard: bool = setting(False, "also write metrics and sample grids as TensorBoard events to RUN/tb (needs the "
                                       "tensorboard package: pip install tensorboard)")

    def check(self, need: Need) -> None:
        need(self.log_every >= 1 and self.eval_every >= 1 and self.ckpt_every >= 1,
             "--log-every, --eval-every and --ckpt-every must be >= 1")
        need(re.fullmatch(r"(\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*)?", self.keep_epochs) is not None,
             f"--keep-epochs must be epochs >= 1 separated by commas (e.g. 8 or 4,8), got {self.keep_epochs!r}")

    @property
    def kept_epochs(self) -> frozenset[int]:
        """The epochs after which ``--keep-epochs`` keeps a copy of the checkpoint."""
        return frozenset(int(e) for e in self.keep_epochs.split(",") if e.strip())


SECTIONS = (RunSettings, ObjectiveSettings, SamplerSettings, OptimSettings, LoopSettings, LogSettings)


@dataclass
class TrainConfig(LogSettings, LoopSettings, OptimSettings, SamplerSettings, ObjectiveSettings, RunSettings):
    """Every knob of a run (fields in the order of ``SECTIONS``)."""

    def __post_init__(self) -> None:
        if type(self.keep_epochs) is int:  # a config file's keep_epochs = 8
            self.keep_epochs = [self.keep_epochs]
        if isinstance(self.keep_epochs, (list, tuple)):  # or [4, 8]
            self.keep_epochs = ",".join(map(str, self.keep_epochs))
        self.validate()
        module, sep, fn = self.model.rpartition(":")
        if sep and module.endswith(".py") and not Path(module).expanduser().is_absolute():
            # a factory file: stored absolute, so eval/score/resume find it from any working directory
            self.model = f"{Path(module).expanduser().resolve()}:{fn}"

    def check_types(self) -> None:
        """Every entry has its field's type (config files and the Python API can hand in anything) and every number
        is finite: a one-line ValueError naming the entry otherwise."""
        for f in fields(self):
            v, t, flag = getattr(self, f.name), str(f.type), "--" + f.name.replace("_", "-")
            if t in ("int", "float") and isinstance(v, bool):
                raise ValueError(f"{flag} must be a number, got {v!r}")
            if t == "int":
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                    setattr(self, f.name, v)
                if not isinstance(v, int):
                    raise ValueError(f"{flag} must be an integer, got {v!r}")
            elif t == "float":
                if not isinstance(v, (int, float)):
                    raise ValueError(f"{flag} must be a number, got {v!r}")
                if not math.isfinite(v):
                    raise ValueError(f"{flag} must be finite, got {v!r}")
                setattr(self, f.name, float(v))
            elif t == "bool" and not isinstance(v, bool):
                raise ValueError(f"{flag} must be true or false, got {v!r}")
            elif t == "str" and not isinstance(v, str):
                raise ValueError(f"{flag} must be a string, got {v!r}")
            elif t == "Optional[str]" and v is not None and not isinstance(v, str):
                raise ValueError(f"{flag} must be a string, got {v!r}")
            elif f.name in ("decay_epochs", "inject_divergence"):
                if not isinstance(v, (list, tuple)) or not all(isinstance(e, int) and not isinstance(e, bool)
                                                               for e in v):
                    raise ValueError(f"{flag} must be a list of integers, got {v!r}")

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        self.check_types()
        for section in SECTIONS:
            section.check(self, need)
        self.decay_epochs = tuple(int(e) for e in self.decay_epochs)
        self.inject_divergence = tuple(int(e) for e in self.inject_divergence)

    # derived -----------------------------------------------------------------------------------------------------
    @property
    def uses_samples(self) -> bool:
        """Does training draw samples (a generative term is on)? False: a plain classifier baseline."""
        return self.p_x_weight > 0 or self.p_x_y_weight > 0

    @property
    def uses_unlabelled(self) -> bool:
        """Does a semi-supervised classifier term (--pseudo-label-weight, --vat-weight) read the unlabelled images?"""
        return self.pseudo_label_weight > 0 or self.vat_weight > 0

    @property
    def class_conditional(self) -> bool:
        """Class-conditional buffer: asked for, or implied when p(x, y) is the only generative term."""
        return self.class_cond_buffer or (self.p_x_y_weight > 0 and self.p_x_weight == 0)

    @property
    def final_sgld_std(self) -> float:
        """The chain noise σ the model last trained with (--px-tail-std in a tail that has one): the σ eval, fresh
        samples and the attack defence sample a trained run with."""
        return self.px_tail_std if self.px_tail_std >= 0 and self.px_tail_scale > 0 else self.sgld_std

    def as_trained(self) -> TrainConfig:
        """This config with one chain noise, the σ the model last trained with (``final_sgld_std``) as --sgld-std: what
        a trained run's sampler, and the probes' chains, are built from."""
        return dataclasses.replace(self, sgld_std=self.final_sgld_std, px_tail_std=-1.0)

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        tag = "" if self.uses_samples else "-baseline"
        model = self.model.rpartition(":")[2] if ":" in self.model else self.model  # a factory: its function name
        return f"{self.dataset}-{model}{tag}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = upgrade_legacy(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config entries: {', '.join(unknown)}")
        return cls(**d)


# Recipes: each paper's official values, read from its official scripts. Layered over the dataclass defaults (which
# are the JEM paper's), under the dataset preset, config files and flags.
RECIPES: dict[str, dict] = {
    # Grathwohl et al. 2020, Algorithm 1 and wgrathwohl/JEM train_wrn_ebm.py: the dataclass defaults
    "jem": {},
    # Yang & Ji, ICCV 2021, sndnyang/JEMPP scripts/jempp_cifar10.sh and train_jempp.py: PYLD (5 outer steps, 5 inner
    # steps at lr 0.2, eps 1, SGLD step 1, no noise), informative (class-Gaussian) initialisation, BatchNorm with the
    # model in train mode while sampling and data/samples through the network separately ("alltrain1"),
    # SGD 0.1 momentum 0.9 wd 4e-4, 1000 warm-up iterations, decay ×0.2 at epochs 50/100/125 of 150, σ_data 0.03
    "jempp": {"sgld_update": "pyld", "sgld_steps": 5, "pyld_inner_steps": 5, "pyld_lr": 0.2, "pyld_eps": 1.0,
              "sgld_lr": 1.0, "sgld_std": 0.0, "sgld_init": "gmm", "sample_mode": "train", "norm": "batch",
              "separate_forward": True, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 4e-4,
              "warmup_iters": 1000, "decay_epochs": (50, 100, 125), "decay_rate": 0.2, "epochs": 150,
              "data_noise": 0.03},
    # Yang, Ji et al., CVPR 2023, sndnyang/SADAJEM scripts/sadajem_cifar10.sh and train_sadajem.py: 5 steps of
    # x ← clip(x + clip(∇, −1, 1), −1, 1) without noise, class-Gaussian initialisation, BatchNorm in train mode,
    # separate forward passes, p(x) on un-augmented data (σ_data 0), adaptive SAM ρ=2 over SGD 0.1 momentum 0.9
    # wd 5e-4, 1000 warm-up iterations, decay ×0.2 at epochs 60/120/180 of 200; 128 labelled images per step and
    # 64 images and chains for p(x) (utils.py get_data: `label_bs = 128` for the labelled loader, --batch_size 64
    # for the p(x) loader and the sampler; an epoch is a pass over the labelled loader)
    "sadajem": {"sgld_update": "clamped", "sgld_steps": 5, "sgld_lr": 1.0, "sgld_std": 0.0, "sgld_init": "gmm",
                "sample_mode": "train", "norm": "batch", "separate_forward": True, "px_augment": False,
                "batch_size": 128, "px_batch_size": 64,
                "data_noise": 0.0, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                "sam_rho": 2.0, "sam_adaptive": True, "warmup_iters": 1000, "decay_epochs": (60, 120, 180),
                "decay_rate": 0.2, "epochs": 200},
}


# training-set sizes of the named datasets (for converting a legacy iteration count into epochs)
_TRAIN_SIZES = {"digits": 1437, "mnist": 60000, "fashion-mnist": 60000, "kmnist": 60000, "cifar10": 50000,
                "cifar100": 50000, "svhn": 73257}


def upgrade_legacy(d: dict) -> dict:
    """A config written by jemtorch 0.1: ``px_ramp_iters`` (iterations) becomes ``px_ramp_epochs``, converted with
    the run's iterations per epoch in one process (its dataset's training images less the validation split, over
    the batch size)."""
    if "px_ramp_iters" not in d:
        return d
    d = dict(d)
    iters = d.pop("px_ramp_iters")
    if not iters:
        return d
    n = _TRAIN_SIZES.get(d.get("dataset", TrainConfig.dataset))
    if n is None or not isinstance(iters, int):
        raise ValueError(f"config entry px_ramp_iters ({iters!r}) was replaced by px_ramp_epochs in jemtorch 0.2; "
                         f"give the ramp in epochs")
    n_valid = d.get("n_valid", -1)
    per_epoch = (n - (n // 10 if n_valid == -1 else n_valid)) // d.get("batch_size", TrainConfig.batch_size)
    d["px_ramp_epochs"] = iters / max(1, per_epoch)
    return d


# ----------------------------------------------------------------------------------------------------------------
# presets, layers, provenance
# ----------------------------------------------------------------------------------------------------------------
def _read_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"cannot parse {where}: {e}") from None


def dataset_preset(dataset: str) -> dict:
    """``jemtorch/presets/<dataset>.toml`` as a dict ({} when the dataset has none): ``recipe`` (its default recipe),
    ``all`` (entries for every recipe) and one table per recipe."""
    path = resources.files("jemtorch") / "presets" / f"{dataset}.toml"
    if not path.is_file():
        return {}
    preset = _read_toml(path.read_text(encoding="utf-8"), f"preset {dataset}.toml")
    unknown = set(preset) - {"recipe", "all", *RECIPES}
    if unknown:
        raise ValueError(f"preset {dataset}.toml: unknown table(s) {', '.join(sorted(unknown))}")
    return preset


def config_layers(args: dict, config_file: Optional[str] = None, base: Optional[dict] = None) -> list[tuple[str, dict]]:
    """The layers of the module docstring, lowest first, as (label, entries) pairs (defaults not included)."""
    flags = {k: v for k, v in args.items() if v is not None}
    above = [("resumed run", upgrade_legacy(dict(base or {}))),
             *(config_file_layers(config_file) if config_file else []), ("flag", flags)]
    given = {k: v for _, layer in above for k, v in layer.items()}
    dataset = given.get("dataset", TrainConfig.dataset)
    preset = dataset_preset(dataset) if isinstance(dataset, str) else {}
    recipe = given.get("recipe") or preset.get("recipe") or TrainConfig.recipe
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    below = [(f"recipe {recipe}", RECIPES[recipe]),
             (f"preset {dataset}.toml", {"recipe": preset["recipe"]} if "recipe" in preset else {}),
             (f"preset {dataset}.toml [all]", preset.get("all", {})),
             (f"preset {dataset}.toml [{recipe}]", preset.get(recipe, {}))]
    return [(label, layer) for label, layer in below + above if layer]


def resolve_with_sources(args: dict, config_file: Optional[str] = None,
                         base: Optional[dict] = None) -> tuple[TrainConfig, dict[str, str]]:
    """The resolved config and, for every field, the layer its value came from ("default" when none set it)."""
    d: dict = {"recipe": TrainConfig.recipe}
    sources = {f.name: "default" for f in fields(TrainConfig)}
    for label, layer in config_layers(args, config_file, base):
        d.update(layer)
        sources.update({k: label for k in layer})
    if d.get("norm") == "none":
        d["norm"] = None
    return TrainConfig.from_dict(d), sources


def resolve_config(args: dict, config_file: Optional[str] = None, base: Optional[dict] = None) -> TrainConfig:
    """defaults < recipe < dataset preset < base (a resumed run's config) < config file < explicit CLI values."""
    return resolve_with_sources(args, config_file, base)[0]


def format_sources(cfg: TrainConfig, sources: dict[str, str]) -> str:
    """The resolved configuration as an aligned table: entry, value, the layer it came from."""
    rows = [(f.name, json.dumps(getattr(cfg, f.name) if not isinstance(getattr(cfg, f.name), tuple)
                                else list(getattr(cfg, f.name))), sources[f.name]) for f in fields(cfg)]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


MAX_EXTENDS = 8  # a chain of config files this long is a mistake (or a cycle) rather than a design


def config_file_layers(path: str | Path) -> list[tuple[str, dict]]:
    """A config file's layers, lowest first: the files it extends (``extends = "base.toml"``, a path relative to the
    file; the base may extend another), then its own entries; each labelled ``config file PATH``."""
    chain: list[tuple[str, dict]] = []
    seen: list[Path] = []
    path = Path(path)
    while True:
        entries = read_config_file(path)
        chain.insert(0, (f"config file {path}", entries))
        seen.append(path.resolve())
        parent = entries.pop("extends", None)
        if parent is None:
            return chain
        if not isinstance(parent, str) or not parent:
            raise ValueError(f"config file {path}: extends must name a config file, got {parent!r}")
        path = path.parent / parent
        if path.resolve() in seen:
            raise ValueError(f"config file {seen[-1]}: extends {parent} makes a cycle")
        if len(seen) > MAX_EXTENDS:
            raise ValueError(f"config file {seen[0]}: more than {MAX_EXTENDS} files extend one another")


def load_config_file(path: str | Path) -> dict:
    """A config file's entries with those of the files it extends under them (``config_file_layers``)."""
    return {k: v for _, entries in config_file_layers(path) for k, v in entries.items()}


def read_config_file(path: str | Path) -> dict:
    """Read one JSON or TOML config file into a dict (keys may use - or _)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        d = _read_toml(text, f"config file {path}")
    else:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"cannot parse config file {path}: {str(e)[:200]}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a table/object of entries")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def add_config_arguments(parser) -> None:
    """One ``--flag`` per TrainConfig field, grouped by section. Flags default to None so only given ones override;
    the help shows each field's default."""
    owner = {f.name: s for s in SECTIONS for f in fields(s)}  # sections do not inherit from each other
    groups = {s: parser.add_argument_group(f"{s.__name__} ({s.__module__.rsplit('.', 1)[-1]}.py)", s.__doc__)
              for s in SECTIONS}
    for f in fields(TrainConfig):
        group = groups[owner[f.name]]
        flag = "--" + f.name.replace("_", "-")
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        help_ = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse formats help with %
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name in ("decay_epochs", "inject_divergence"):
            group.add_argument(flag, dest=f.name, type=int, nargs="*", default=None, help=help_)
        elif f.name == "norm":
            group.add_argument(flag, dest=f.name, default=None, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str, "Optional[str]": str}.get(str(f.type), str)
            group.add_argument(flag, dest=f.name, type=typ, default=None, help=help_)


# what a resumed run cannot change: the checkpoint's weights, buffer, optimiser state and data order are built on them
RESUME_FIXED = ("dataset", "model", "norm", "dropout", "seed", "n_valid", "labels_per_class", "batch_size",
                "buffer_size", "class_cond_buffer", "optimizer", "recipe")
RESUME_IGNORED = ("out", "name", "progress", "device", "keep_epochs")  # changes that are not worth a log line
# what training never reads (only the sampling after it: jem eval's fresh chains), so runs that differ only in these
# trained the same weights and benchmarks/quality.py reuses them
SAMPLING_ONLY = ("sample_step_cap",)
# what a run without generative terms (a classifier baseline, p_x_weight = p_x_y_weight = 0) never reads: it trains
# to the same weights whatever their values (tests/test_train.py checks it), so benchmarks/quality.py reuses a
# baseline across presets that differ only in these
GENERATIVE_ONLY = ("px_data_batches", "px_start_epoch", "px_stop_epoch", "px_tail_scale", "px_tail_std",
                   "px_fade_epochs", "px_pause_epochs", "px_tail_grad", "px_tail_leak", "px_ramp_epochs",
                   "px_target_reach", "px_scale_min",
                   "energy_reg", "energy_reg_form", "sgld_steps", "sgld_steps_max", "sgld_lr", "sgld_std",
                   "sgld_clamp", "sgld_step_cap", "sgld_cap_noise", "sgld_update", "pyld_inner_steps", "pyld_lr",
                   "pyld_eps", "cd_weight", "cd_batch_size", "cd_steps", "grad_penalty", "grad_penalty_batch",
                   "grad_surgery", "reinit_freq")


def saved_defaults() -> dict:
    """Every field's default as config.json stores it (tuples become lists)."""
    return json.loads(json.dumps(TrainConfig().to_dict()))


def training_differences(saved: dict, wanted: dict) -> list[str]:
    """The config fields two runs differ in that change what is trained: neither where a run is written
    (RESUME_IGNORED), nor what only the sampling after training reads (SAMPLING_ONLY), nor how the data's folder is
    spelt, nor, when both are baselines, the generative terms' settings
    (GENERATIVE_ONLY). A field missing from a config saved before it existed counts as its default: fields are added
    with the earlier behaviour as their default."""
    defaults = saved_defaults()
    saved, wanted = {**defaults, **upgrade_legacy(saved)}, {**defaults, **upgrade_legacy(wanted)}
    for d in (saved, wanted):  # the same folder, named relative to the working directory or in full
        d["data_root"] = str(Path(d["data_root"]).expanduser().resolve())
    baselines = all(d["p_x_weight"] == 0 and d["p_x_y_weight"] == 0 for d in (saved, wanted))
    ignored = set(RESUME_IGNORED) | set(SAMPLING_ONLY) | (set(GENERATIVE_ONLY) if baselines else set())
    return sorted(k for k in saved.keys() | wanted.keys() if k not in ignored and saved.get(k) != wanted.get(k))


def resume_changes(old: dict, new: TrainConfig) -> dict:
    """Entries a resume changes, {name: [old, new]}; a one-line ValueError for one it cannot change. A field the old
    config lacks (added since it was written) had its default, which keeps the earlier behaviour."""
    new_d = json.loads(json.dumps(new.to_dict()))
    old = {**saved_defaults(), **old}
    changed = {k: [old.get(k), v] for k, v in new_d.items() if k in old and old[k] != v and k not in RESUME_IGNORED}
    fixed = [k for k in changed if k in RESUME_FIXED]
    if fixed:
        what = ", ".join(f"--{k.replace('_', '-')} ({changed[k][0]} -> {changed[k][1]})" for k in fixed)
        raise ValueError(f"--resume cannot change {what}: the checkpoint was trained with the old value; start a new "
                         f"run instead (--out)")
    return changed


def make_config(config_file: Optional[str] = None, **entries) -> TrainConfig:
    """The Python twin of ``jem train --flag value``: ``make_config(dataset="digits", epochs=5)`` applies the dataset
    preset under the given entries, exactly as the CLI does."""
    return resolve_config(entries, config_file)
