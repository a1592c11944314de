"""Training configuration: one flat dataclass, every field a CLI flag (``--field-name``) and a config-file entry.

Resolution order: dataclass defaults < the dataset's preset (registered with the dataset in data.py) < ``--config FILE`` (JSON or TOML) <
command-line flags. The resolved config is written to ``RUN_DIR/config.json`` and stored in every checkpoint.

The dataclass defaults are the paper's (Grathwohl et al. 2020, Algorithm 1 and the official code: WRN-28-10 without
normalisation, Adam 1e-4, 1000 warm-up iterations, SGLD α=1 σ=0.01 η=20, ρ=0.05, buffer 10 000, data noise 0.03).
A preset changes only what does not fit its dataset — e.g. the bundled 8×8 digits (20 iterations per epoch) train a
small CNN at lr 1e-3, since the paper's warm-up alone would last 50 epochs there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .data import dataset_preset, dataset_recipe
from .objective import ENERGY_REG_FORMS
from .sampler import CHAIN_UPDATES, INITIAL_DISTRIBUTIONS


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train ---
    dataset: str = _f("digits", "dataset name: digits, mnist, fashion-mnist, kmnist, cifar10, cifar100, svhn, imagefolder")
    data_root: str = _f("./data", "folder holding the dataset in torchvision's layout (see README)")
    download: bool = _f(False, "download a missing dataset from its official URL (md5-verified)")
    model: str = _f("wrn-28-10", "model name: cnn, cnn-<width>, wrn-<depth>-<width> (paper: wrn-28-10), or your "
                    "own factory package.module:function or file.py:function (called with in_channels, num_classes)")
    norm: Optional[str] = _f(None, "normalisation layers (cnn and wrn models): none, batch, instance, layer (paper: none)")
    dropout: float = _f(0.0, "dropout rate in the model")
    name: Optional[str] = _f(None, "run name; the run directory defaults to runs/<name>")
    out: Optional[str] = _f(None, "run directory (default runs/<name>, name defaults to <dataset>-<model>[-baseline])")
    seed: int = _f(0, "random seed (data order, initialisation, SGLD noise)")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N")
    amp: str = _f("none", "mixed precision: none, or bf16 (autocast for the network's forward passes in sampling and "
                          "the loss; chains, loss and weights stay fp32)")
    channels_last: bool = _f(False, "channels-last memory format for the network and its inputs (faster convolutions "
                                    "on recent GPUs)")
    compile: bool = _f(False, "torch.compile the network (needs a working Inductor backend: a C++ compiler on CPU, "
                              "Triton on GPU)")

    recipe: str = _f("jem", "training recipe, every field set to that paper's official values (any can be overridden): "
                            "jem (Grathwohl et al. 2020), jempp (JEM++, Yang & Ji 2021), sadajem (SADA-JEM, Yang et al. "
                            "2023); the dataset's preset picks its default")

    # --- objective: L = w_clf·(−log p(y|x)) + w_px·(−log p(x)) + w_pxy·(−log p(x, y)) ---
    p_y_given_x_weight: float = _f(1.0, "weight of the classification term −log p(y|x)")
    p_x_weight: float = _f(1.0, "weight of the generative term −log p(x); 0 trains a plain classifier")
    p_x_y_weight: float = _f(0.0, "weight of −log p(x, y) with class-conditional samples (paper's p(x|y) factored)")
    px_start_epoch: int = _f(0, "train the classifier alone for this many epochs before the generative terms switch "
                                "on (0: from the start, as the papers)")
    px_ramp_epochs: float = _f(0.0, "once the generative terms switch on, raise their weights (and the energy "
                                    "penalty's) linearly from 0 to their values over this many epochs, fractions "
                                    "allowed (0: at once, as the papers)")
    energy_reg: float = _f(0.0, "weight λ of λ·(E(data)² + E(samples)²), an energy-magnitude regulariser "
                                "(Du & Mordatch 2019; not in the JEM paper)")
    energy_reg_form: str = _f("per-example", "what --energy-reg squares: per-example (the mean of E², Du & Mordatch "
                                             "2019, M-EBM: holds every image's energy at the same value) or batch-mean "
                                             "(the square of the batch's mean E: holds only the level, so confident "
                                             "images keep a larger LogSumExp)")
    class_cond_buffer: bool = _f(False, "split the replay buffer by class (implied by --p-x-y-weight > 0 alone)")
    labels_per_class: int = _f(-1, "semi-supervised: keep labels for this many examples per class (-1: all)")

    # --- SGLD sampler and replay buffer ---
    sgld_steps: int = _f(20, "SGLD steps per training iteration η (paper: 20)")
    sgld_lr: float = _f(1.0, "SGLD step size α (paper: 1)")
    sgld_std: float = _f(0.01, "SGLD noise σ (paper: 0.01)")
    sgld_clamp: bool = _f(False, "clamp SGLD chains to the image range [−1, 1] after every step (paper: no)")
    sgld_update: str = _f("sgld", "chain update: sgld (paper), clamped (SADA-JEM: clip(x + α·clip(∇, −1, 1))), "
                                  "pyld (JEM++: proximal inner steps through the first layer)")
    sgld_init: str = _f("uniform", "initial distribution of chains: uniform (paper), gmm (JEM++: one Gaussian per "
                                   "class fitted on the training images), gaussian (M-EBM: one Gaussian)")
    sample_mode: str = _f("eval", "network mode while sampling: eval, or train (BatchNorm uses batch statistics, as "
                                  "JEM++/SADA-JEM; running averages untouched)")
    pyld_inner_steps: int = _f(5, "PYLD inner proximal steps per outer step (JEM++ script: 5)")
    pyld_lr: float = _f(0.2, "PYLD inner step size (JEM++ script: 0.2)")
    pyld_eps: float = _f(1.0, "PYLD inner gradient clip (JEM++: 1)")
    buffer_size: int = _f(10000, "replay buffer size (paper: 10000)")
    reinit_freq: float = _f(0.05, "probability ρ of restarting a chain from U(−1, 1) (paper: 0.05)")
    data_noise: float = _f(0.03, "std of Gaussian noise added to training images σ_data (paper: 0.03)")
    augment: bool = _f(True, "random crop (reflect pad) and flips where they fit the dataset")
    px_augment: bool = _f(True, "the p(x) term sees augmented data too (paper: yes; SADA-JEM: no, un-augmented images)")
    separate_forward: bool = _f(False, "pass data, p(x) data and samples through the network separately (needed with "
                                       "BatchNorm: no shared batch statistics); off: one concatenated forward pass")

    # --- optimisation ---
    optimizer: str = _f("adam", "adam or sgd")
    lr: float = _f(1e-4, "learning rate (paper: Adam 1e-4)")
    momentum: float = _f(0.9, "SGD momentum")
    sam_rho: float = _f(0.0, "sharpness-aware minimisation radius ρ (SADA-JEM: 2 with adaptive SAM); 0: off")
    sam_adaptive: bool = _f(True, "adaptive SAM (ASAM, Kwon et al. 2021), as SADA-JEM uses for ρ ≥ 0.5")
    weight_decay: float = _f(0.0, "weight decay")
    warmup_iters: int = _f(1000, "linear learning-rate warm-up iterations (paper: 1000)")
    schedule: str = _f("step", "learning-rate schedule after warm-up: step (×decay-rate at --decay-epochs; the papers') "
                               "or cosine (to 0 at the last iteration)")
    decay_epochs: tuple = _f((), "epochs at which the learning rate is multiplied by --decay-rate (paper: 160 180)")
    decay_rate: float = _f(0.3, "learning-rate decay factor")
    batch_size: int = _f(64, "batch size (data and SGLD samples each; paper: 64)")
    px_batch_size: int = _f(-1, "images and chains per step in the p(x) term when smaller than --batch-size (-1: the "
                                "batch size, as the papers); the classifier keeps the full batch")
    epochs: int = _f(200, "training epochs (paper: 200 on CIFAR-10)")
    max_iters: int = _f(-1, "stop after this many iterations (-1: run all epochs)")
    time_limit: float = _f(0.0, "training-time budget in seconds (0: none): stop after the last whole epoch that fits "
                                "(judged by the longer of the mean and the last epoch), or mid-epoch once the budget "
                                "is spent; then validate, test and save as at the end. The lr schedule stays the one "
                                "for --epochs")
    n_valid: int = _f(-1, "held-out validation examples for best-checkpoint selection (-1: 10% of train, 0: none)")
    clip_grad: float = _f(0.0, "clip the gradient norm to this value (0: off)")
    max_energy_gap: float = _f(200.0, "a step with |E(data) − E(samples)| above this, or a non-finite loss, counts "
                                      "as divergence")
    max_rollbacks: int = _f(20, "recover from at most this many divergences (see README: the recovery ladder), then "
                                "stop (0: stop at the first divergence)")
    snapshot_every: int = _f(100, "keep an in-memory snapshot of model, optimiser and replay buffer every N healthy "
                                  "iterations")
    snapshots_kept: int = _f(4, "how many snapshots to keep; a repeated divergence steps further back")
    inject_divergence: tuple = _f((), "fault injection for testing recovery: report a divergence at these iterations "
                                      "(each once)")

    # --- logging, samples, checkpoints ---
    log_every: int = _f(20, "write a metrics.jsonl record every N iterations")
    sample_every: int = _f(-1, "write sample grids every N iterations (-1: every 10 epochs and at the end)")
    eval_every: int = _f(1, "evaluate on the validation split every N epochs")
    ckpt_every: int = _f(1, "write the resumable checkpoint every N epochs (and at the end)")
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(False, "also write metrics and sample grids as TensorBoard events to RUN/tb (needs the "
                                  "tensorboard package: pip install tensorboard)")

    def __post_init__(self) -> None:
        module, sep, fn = self.model.rpartition(":")
        if sep and module.endswith(".py") and not Path(module).expanduser().is_absolute():
            # a factory file: stored absolute, so eval/score/resume find it from any working directory
            self.model = f"{Path(module).expanduser().resolve()}:{fn}"
        self.validate()

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
        need(self.sgld_steps >= 0, f"--sgld-steps must be >= 0, got {self.sgld_steps}")
        need(self.sgld_lr >= 0, f"--sgld-lr must be >= 0, got {self.sgld_lr}")
        need(self.sgld_std >= 0, f"--sgld-std must be >= 0, got {self.sgld_std}")
        need(self.buffer_size >= 1, f"--buffer-size must be >= 1, got {self.buffer_size}")
        need(0 <= self.reinit_freq <= 1, f"--reinit-freq must be in [0, 1], got {self.reinit_freq}")
        need(self.data_noise >= 0, f"--data-noise must be >= 0, got {self.data_noise}")
        need(self.sgld_update in CHAIN_UPDATES,
             f"--sgld-update must be one of {', '.join(CHAIN_UPDATES)}, got {self.sgld_update!r}")
        need(self.sgld_init in INITIAL_DISTRIBUTIONS,
             f"--sgld-init must be one of {', '.join(INITIAL_DISTRIBUTIONS)}, got {self.sgld_init!r}")
        need(self.energy_reg_form in ENERGY_REG_FORMS,
             f"--energy-reg-form must be one of {', '.join(ENERGY_REG_FORMS)}, got {self.energy_reg_form!r}")
        need(self.sample_mode in ("eval", "train"), f"--sample-mode must be eval or train, got {self.sample_mode!r}")
        need(self.pyld_inner_steps >= 0 and self.pyld_lr >= 0 and self.pyld_eps > 0,
             "--pyld-inner-steps, --pyld-lr must be >= 0 and --pyld-eps > 0")
        need(self.optimizer in ("adam", "sgd"), f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_iters >= 0, f"--warmup-iters must be >= 0, got {self.warmup_iters}")
        need(self.decay_rate > 0, f"--decay-rate must be > 0, got {self.decay_rate}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.px_batch_size == -1 or 1 <= self.px_batch_size <= self.batch_size,
             f"--px-batch-size must be -1 or in 1..--batch-size, got {self.px_batch_size}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(min(self.p_y_given_x_weight, self.p_x_weight, self.p_x_y_weight) >= 0, "loss weights must be >= 0")
        need(self.momentum >= 0, f"--momentum must be >= 0, got {self.momentum}")
        need(self.clip_grad >= 0, f"--clip-grad must be >= 0 (0: off), got {self.clip_grad}")
        need(self.max_iters >= -1, f"--max-iters must be -1 (no limit) or >= 0, got {self.max_iters}")
        need(self.time_limit >= 0, f"--time-limit must be >= 0 seconds (0: no limit), got {self.time_limit}")
        need(self.n_valid >= -1, f"--n-valid must be -1 (10%) or >= 0, got {self.n_valid}")
        need(self.px_start_epoch >= 0, f"--px-start-epoch must be >= 0, got {self.px_start_epoch}")
        need(self.px_ramp_epochs >= 0, f"--px-ramp-epochs must be >= 0, got {self.px_ramp_epochs}")
        need(self.energy_reg >= 0, f"--energy-reg must be >= 0, got {self.energy_reg}")
        need(self.p_y_given_x_weight + self.p_x_weight + self.p_x_y_weight > 0, "at least one loss weight must be > 0")
        need(self.labels_per_class == -1 or self.labels_per_class >= 1,
             f"--labels-per-class must be -1 (all) or >= 1, got {self.labels_per_class}")
        need(self.norm in (None, "none", "batch", "instance", "layer"),
             f"--norm must be none, batch, instance or layer, got {self.norm!r}")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.log_every >= 1 and self.eval_every >= 1 and self.ckpt_every >= 1,
             "--log-every, --eval-every and --ckpt-every must be >= 1")
        need(self.max_rollbacks >= 0, "--max-rollbacks must be >= 0")
        need(self.snapshot_every >= 1, "--snapshot-every must be >= 1")
        need(self.snapshots_kept >= 1, "--snapshots-kept must be >= 1")
        need(self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        need(self.schedule in ("step", "cosine"), f"--schedule must be step or cosine, got {self.schedule!r}")
        need(self.amp in ("none", "bf16"), f"--amp must be none or bf16, got {self.amp!r}")
        need(self.sam_rho >= 0, f"--sam-rho must be >= 0, got {self.sam_rho}")
        need(self.max_energy_gap > 0, "--max-energy-gap must be > 0")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps",
             f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.decay_epochs = tuple(int(e) for e in self.decay_epochs)
        self.inject_divergence = tuple(int(e) for e in self.inject_divergence)

    # derived -----------------------------------------------------------------------------------------------------
    @property
    def uses_samples(self) -> bool:
        """Does training draw samples (a generative term is on)? False: a plain classifier baseline."""
        return self.p_x_weight > 0 or self.p_x_y_weight > 0

    @property
    def class_conditional(self) -> bool:
        """Class-conditional buffer: asked for, or implied when p(x, y) is the only generative term."""
        return self.class_cond_buffer or (self.p_x_y_weight > 0 and self.p_x_weight == 0)

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


def load_config_file(path: str | Path) -> dict:
    """Read a JSON or TOML config file into a dict (keys may use - or _)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            d = tomllib.loads(text)
        else:
            d = json.loads(text)
    except Exception as e:
        raise ValueError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a table/object of entries")
    return {k.replace("-", "_"): v for k, v in d.items()}


def add_config_arguments(parser) -> None:
    """Add one ``--flag`` per TrainConfig field. Flags default to None so only given ones override."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata['help']} (default: {f.default if f.default is not dataclasses.MISSING else []})"
        help_ = help_.replace("%", "%%")  # argparse formats help strings with %
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name in ("decay_epochs", "inject_divergence"):
            parser.add_argument(flag, dest=f.name, type=int, nargs="*", default=None, help=help_)
        elif f.name == "norm":
            parser.add_argument(flag, dest=f.name, default=None, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str, "Optional[str]": str}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=typ, default=None, help=help_)


def resolve_config(args: dict, config_file: Optional[str] = None, base: Optional[dict] = None) -> TrainConfig:
    """defaults < recipe < dataset preset < base (a resumed run's config) < config file < explicit CLI values.

    The recipe is the one given (flag, file, resumed config), else the dataset preset's, else ``jem``. The dataset
    preset has entries for every recipe and entries for one recipe only (see ``data.register_dataset``)."""
    given = dict(base or {})
    if config_file:
        given.update(load_config_file(config_file))
    given.update({k: v for k, v in args.items() if v is not None})
    dataset = given.get("dataset", TrainConfig.dataset)
    recipe = given.get("recipe") or dataset_recipe(dataset) or TrainConfig.recipe
    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    d = {"recipe": recipe, **RECIPES[recipe], **dataset_preset(dataset, recipe)}
    d.update(given)
    if d.get("norm") == "none":
        d["norm"] = None
    return TrainConfig.from_dict(d)


# what a resumed run cannot change: the checkpoint's weights, buffer, optimiser state and data order are built on them
RESUME_FIXED = ("dataset", "model", "norm", "dropout", "seed", "n_valid", "labels_per_class", "batch_size",
                "buffer_size", "class_cond_buffer", "optimizer", "recipe")
RESUME_IGNORED = ("out", "name", "progress", "device")  # changes that are not worth a log line
# what a run without generative terms (a classifier baseline, p_x_weight = p_x_y_weight = 0) never reads: it trains
# to the same weights whatever their values (tests/test_train.py checks it), so benchmarks/quality.py reuses a
# baseline across presets that differ only in these
GENERATIVE_ONLY = ("px_start_epoch", "px_ramp_epochs", "energy_reg", "energy_reg_form", "sgld_steps", "sgld_lr",
                   "sgld_std", "sgld_clamp", "sgld_update", "pyld_inner_steps", "pyld_lr", "pyld_eps")


def training_differences(saved: dict, wanted: dict) -> list[str]:
    """The config fields two runs differ in that change what is trained: neither where a run is written
    (RESUME_IGNORED) nor, when both are baselines, the generative terms' settings (GENERATIVE_ONLY). A field missing
    from a config saved before it existed counts as its default: fields are added with the earlier behaviour as
    their default."""
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))  # as saved: tuples become lists
    saved, wanted = {**defaults, **upgrade_legacy(saved)}, {**defaults, **upgrade_legacy(wanted)}
    baselines = all(d["p_x_weight"] == 0 and d["p_x_y_weight"] == 0 for d in (saved, wanted))
    ignored = set(RESUME_IGNORED) | (set(GENERATIVE_ONLY) if baselines else set())
    return sorted(k for k in saved.keys() | wanted.keys() if k not in ignored and saved.get(k) != wanted.get(k))


def resume_changes(old: dict, new: TrainConfig) -> dict:
    """Entries a resume changes, {name: [old, new]}; a one-line ValueError for one it cannot change."""
    new_d = json.loads(json.dumps(new.to_dict()))
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
