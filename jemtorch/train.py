"""JEM training (Algorithm 1 of Grathwohl et al. 2020), one batch followed from the stream to the optimiser:

    x, y   ← labelled stream, batch s, augmented on the device (+ σ_data noise)                  training_batch
    x_px   ← the p(x) batch: x itself, un-augmented images (SADA-JEM) or unlabelled images        training_batch
    w      ← loss weights at step s: classifier-only phase, p(x) ramp, the recovery's penalty     Phases.weights
    x̂      ← sampler: replay buffer → K chain steps on log p(x) (parameters frozen) → buffer      forward_backward
    loss   ← objective.jem_loss(jem, x, y, x_px, x̂, x̂_y); backward; gradient clipping           forward_backward
             (--grad-surgery: the density's gradient projected off the classifier's;             split_backward
             --px-tail-grad logit-shift: in the tail, kept on the logits' common shift)          shift_backward
    guard  ← a non-finite statistic or |E(data) − E(samples)| > max_energy_gap rolls the state
             back (recovery.Recovery) instead of stepping                                         Trainer.iteration
    θ      ← optimiser step (SAM: a second gradient at the sharpest nearby weights); lr schedule  optimizer_step

Around the step, the callbacks (callbacks.py) log, validate, draw, checkpoint, watch the clock and the health of the
generative half (health.py). The p(x) term equals the energy gap E(data) − E(samples).
"""
from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .build import build_jem, init_images, pick_device, speed_settings
from .callbacks import (
    Callback,
    Checkpoint,
    Curves,
    FaultInjection,
    Interrupt,
    MetricsWindow,
    SampleGrids,
    Timer,
    Validation,
    WeightAverage,
    accuracy_and_nll,
    callback_states,
    weights_in,
)
from .checkpoint import CheckpointError, load_safe, rng_state, set_rng_state
from .config import TrainConfig
from .data import BatchStream, ImageData, Splits, augment, labeled_subset, load_dataset, to_float, training_splits
from .distributed import Dist
from .energy import JEM, logit_head, nonfinite_weights
from .health import AdaptivePx, AdaptiveSteps, Health
from .objective import Weights, classifier_terms, jem_loss, logit_shift, split_gradients
from .optim import SAM, build_optimizer, lr_factor
from .recovery import Recovery, TrainingDiverged
from .rundir import METRICS, TENSORBOARD_DIR, MetricsLog, RunDir, TensorBoardLog
from .sampler import JEMSampler, build_sampler, running_stats_frozen
from .version import __version__

__all__ = ["Trainer", "TrainState", "TrainingDiverged", "train"]


# --------------------------------------------------------------------------------------------------------------
# what a step reads and changes
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything one iteration reads and changes: the core of the checkpoint."""

    jem: JEM  # the model; the sampler runs through it (no DDP communication in the K chain steps)
    loss_jem: JEM  # what the loss runs through: ``jem``, or under torch.distributed its DDP wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    sampler: JEMSampler
    sam: Optional[SAM] = None
    step: int = 0

    @property
    def buffer(self):
        return self.sampler.buffer

    def state_dict(self) -> dict:
        return {"model": self.jem.f.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "buffer": self.buffer.state_dict(), "rng": rng_state(),
                "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.jem.f.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.buffer.load_state_dict(state["buffer"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])


@dataclass
class Clock:
    """Iterations: per epoch, the planned total, and the total (``--time-limit`` may lower it)."""

    iters_per_epoch: int
    total_iters: int
    planned_iters: int

    @classmethod
    def of(cls, cfg: TrainConfig, iters_per_epoch: int) -> Clock:
        total = cfg.epochs * iters_per_epoch if cfg.max_iters < 0 else min(cfg.epochs * iters_per_epoch, cfg.max_iters)
        return cls(iters_per_epoch, total, total)


@dataclass(frozen=True)
class Phases:
    """When the generative terms train: from ``start`` (``--px-start-epoch``), faded in over ``ramp`` iterations
    (``--px-ramp-epochs``), until ``stop`` (``--px-stop-epoch``; None: to the end), then at ``tail_scale`` of their
    weights (``--px-tail-scale``; 0: off), reached linearly over ``fade`` iterations (``--px-fade-epochs``; 0: at
    once) or after ``pause`` iterations of the classifier alone (``--px-pause-epochs``), with chains of noise
    ``tail_std`` (``--px-tail-std``) instead of ``std`` (``--sgld-std``); and the semi-supervised classifier terms
    (Pseudo-Label, VAT: on throughout) raised linearly over their first ``pl_ramp`` iterations
    (``--pseudo-label-warmup``);
    converted from epochs to iterations here, once."""

    start: int
    ramp: int
    uses_samples: bool
    stop: Optional[int] = None
    tail_scale: float = 0.0
    std: float = 0.01
    tail_std: float = 0.01
    fade: int = 0
    pause: int = 0
    pl_ramp: int = 0

    @classmethod
    def of(cls, cfg: TrainConfig, clock: Clock) -> Phases:
        ipe = clock.iters_per_epoch
        return cls(cfg.px_start_epoch * ipe, round(cfg.px_ramp_epochs * ipe), cfg.uses_samples,
                   None if cfg.px_stop_epoch < 0 else cfg.px_stop_epoch * ipe, cfg.px_tail_scale,
                   cfg.sgld_std, cfg.final_sgld_std, round(cfg.px_fade_epochs * ipe), round(cfg.px_pause_epochs * ipe),
                   round(cfg.pseudo_label_warmup * clock.planned_iters))

    def tail(self, step: int) -> bool:
        """Past ``--px-stop-epoch``."""
        return self.stop is not None and step >= self.stop

    def chain_std(self, step: int) -> float:
        """The training chains' noise σ at ``step``."""
        return self.tail_std if self.tail(step) else self.std

    def generative(self, step: int) -> bool:
        return self.uses_samples and self.start <= step and self.tail_share(step) > 0

    def tail_share(self, step: int) -> float:
        """The share of their weights the generative terms keep at ``step``: 1 before ``stop``, then falling linearly
        over ``fade`` iterations to ``tail_scale``, or 0 for ``pause`` iterations and then ``tail_scale``."""
        if not self.tail(step):
            return 1.0
        into = step - self.stop + 1
        if into <= self.pause:
            return 0.0
        return self.tail_scale if into >= self.fade else 1.0 - (1.0 - self.tail_scale) * into / self.fade

    def started(self, step: int) -> bool:
        """The generative terms have switched on (they may have stopped again: the classifier's tail)."""
        return self.uses_samples and step >= self.start

    def weights(self, w: Weights, step: int, scale: float = 1.0) -> Weights:
        """The loss weights at ``step``: generative terms off before ``start``, then raised linearly (with the
        energy and gradient penalties) over ``ramp`` iterations, at ``tail_share`` after ``stop``; times ``scale``
        (health.AdaptivePx) throughout; the semi-supervised terms on their own ramp (VAT's entropy not)."""
        if w.unlabelled and step < self.pl_ramp:
            w = replace(w, pl=w.pl * (step + 1) / self.pl_ramp, vat=w.vat * (step + 1) / self.pl_ramp)
        if not self.generative(step):
            return replace(w, px=0.0, pxy=0.0, cd=0.0, gp=0.0)
        into = step - self.start + 1
        r = scale * (into / self.ramp if self.ramp > 0 and into < self.ramp else 1.0)
        r *= self.tail_share(step)
        return w if r == 1.0 else replace(w, px=r * w.px, pxy=r * w.pxy, energy_reg=r * w.energy_reg, cd=r * w.cd,
                                          gp=r * w.gp)


# --------------------------------------------------------------------------------------------------------------
# one step
# --------------------------------------------------------------------------------------------------------------
def training_batch(cfg: TrainConfig, labeled: BatchStream, unlabeled: Optional[BatchStream], step: int, pad: int,
                   flip: bool, extra: Optional[BatchStream] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                            Optional[torch.Tensor]]:
    """Step ``step``'s labelled batch (augmented) and, when it is not the labelled batch itself, the p(x) batch:
    its first ``n_chains(cfg, x)`` images are the chains' counterparts, then ``extra``'s images (--px-data-batches).
    Semi-supervised, the p(x) batch holds unlabelled images, which the Pseudo-Label and VAT terms read too."""
    x_u8, y = labeled.batch(step)
    x = augment(to_float(x_u8), pad, flip, cfg.data_noise)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n_px = n_chains(cfg, x)
    if not (cfg.uses_samples or cfg.uses_unlabelled) or (unlabeled is None and cfg.px_augment and n_px >= len(x) and extra is None):
        return x, y, None
    seen = (pad, flip) if cfg.px_augment else (0, False)  # SADA-JEM: p(x) on un-augmented images
    if unlabeled is None and cfg.px_augment:
        x_px = x[:n_px]
    else:
        x_px = augment(to_float((unlabeled.batch(step)[0] if unlabeled is not None else x_u8)[:n_px]), *seen,
                       cfg.data_noise)
    if extra is not None:
        x_px = torch.cat([x_px, augment(to_float(extra.batch(step)[0]), *seen, cfg.data_noise)])
    return x, y, x_px


def n_chains(cfg: TrainConfig, x: torch.Tensor) -> int:
    """How many chains (samples) a step's p(x) term runs: --px-batch-size, or one per labelled image."""
    return cfg.px_batch_size if cfg.px_batch_size > 0 else len(x)


def forward_backward(state: TrainState, cfg: TrainConfig, batch, weights: Weights,
                     autocast: Callable, shift_head: Optional[torch.nn.Linear] = None) -> tuple[dict, Callable]:
    """Samples x̂ (and x̂_y), the loss, its gradient (clipped at ``--clip-grad``). Returns the step's statistics
    (0-d tensors, no host sync) and the loss function, which SAM evaluates again at perturbed weights. ``shift_head``
    (--px-tail-grad logit-shift, in the tail: the logit layer): the generative terms train its logits' shift."""
    x, y, x_px = batch
    x_px = x_px if weights.px > 0 or weights.unlabelled else None
    samples = samples_y = x_cd = None
    px_data = x_px if x_px is not None else x
    n = min(len(px_data), n_chains(cfg, x))  # the chains' count; --px-data-batches adds data images beyond it
    x_gp = px_data[:cfg.grad_penalty_batch or n] if weights.gp > 0 else None
    with autocast():  # --amp bf16: the network's forward passes; the chains themselves stay fp32
        if weights.cd > 0:  # chains from the data (before the buffer's, whose statistics the sampler keeps)
            x_cd = state.sampler.run_chains(state.jem, px_data[:cfg.cd_batch_size or n], n_steps=cfg.cd_steps or None)
        if weights.px > 0:
            samples = state.sampler.sample(state.jem, n)  # x̂ ~ p(x)
            chains = dict(state.sampler.stats)  # how far the p(x) chains moved (health.py)
        if weights.pxy > 0:
            samples_y = state.sampler.sample(state.jem, len(x), y=y)  # x̂_y ~ p(x|y)

    def loss_fn() -> tuple[torch.Tensor, dict]:
        with autocast():
            return jem_loss(state.loss_jem, x, y, weights=weights, x_px=x_px, samples=samples, samples_y=samples_y,
                            x_cd=x_cd, x_gp=x_gp, separate=cfg.separate_forward, running=cfg.px_norm == "running")

    loss, stats = loss_fn()
    state.opt.zero_grad(set_to_none=True)
    generative, clf_loss = weights.clf > 0 and (weights.px > 0 or weights.pxy > 0), classifier_terms(weights, stats)
    if shift_head is not None and generative:
        shift_backward(clf_loss, loss, shift_head, cfg.px_tail_leak)
    elif cfg.grad_surgery and generative:
        split_backward(clf_loss, loss, state.jem.parameters(), stats)
    else:
        loss.backward()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(state.jem.parameters(), clip_norm(cfg))
    if samples is not None:
        stats.update(chains)
        if state.sampler.grad_norm is not None:
            stats["sgld_grad_norm"] = state.sampler.grad_norm
    return stats, loss_fn


def split_backward(clf_loss: torch.Tensor, loss: torch.Tensor, params, stats: dict) -> None:
    """--grad-surgery: the classifier's and the generative terms' gradients apart (objective.split_gradients), the
    second projected off the first where they conflict, their sum in ``p.grad``, their statistics into ``stats``."""
    params = [p for p in params if p.requires_grad]
    c, g, split = split_gradients(params, clf_loss, loss, project=True)
    stats.update(split)
    for p, cp, gp in zip(params, c, g):
        p.grad = cp + gp


def shift_backward(clf_loss: torch.Tensor, loss: torch.Tensor, head: torch.nn.Linear, leak: float = 0.0) -> None:
    """--px-tail-grad logit-shift: ``p.grad`` = ∇ clf_loss + leak·∇ gen + (1 − leak)·(∇ gen kept on the shift ``head``
    adds to every logit, objective.logit_shift), gen = loss − clf_loss. One backward pass through the network; the
    shift's gradient goes back to ``head`` only, before it."""
    gen = loss - clf_loss
    shift = logit_shift(gen, head)
    (clf_loss + leak * gen if leak > 0 else clf_loss).backward()  # no pass through the samples' terms at leak 0
    for p, g in shift:
        p.grad = (1 - leak) * g if p.grad is None else p.grad + (1 - leak) * g


def clip_norm(cfg: TrainConfig) -> float:
    return cfg.clip_grad if cfg.clip_grad > 0 else float("inf")


def reduce_stats(stats: dict, max_energy_gap: float, dist: Dist) -> tuple[dict, bool]:
    """The statistics as Python floats (one host sync; under torch.distributed one all-reduce: means over ranks) and
    whether the step is sound (may be applied): every value finite and |energy gap| ≤ ``max_energy_gap`` on every
    rank. (Not to be confused with health.py's verdict on the generative half.)"""
    names = list(stats)
    vec = torch.stack([stats[k].detach().float() for k in names])
    gap = stats.get("energy_gap")
    bad = ~torch.isfinite(vec).all() | (gap.detach().abs() > max_energy_gap if gap is not None else False)
    *means, n_bad = dist.all_reduce_mean(torch.cat([vec, bad.float().view(1)])).tolist()
    values = dict(zip(names, means))
    return values, n_bad == 0 and all(math.isfinite(v) for v in values.values())


def optimizer_step(state: TrainState, loss_fn: Callable, max_norm: float, sam: bool = True) -> None:
    """θ ← optimiser step (SAM, unless ``sam`` is false: the gradient at the sharpest nearby weights, same batches and
    samples); lr schedule."""
    if state.sam is not None and sam:
        state.sam.first_step()
        with running_stats_frozen(state.jem):
            loss_fn()[0].backward()
        torch.nn.utils.clip_grad_norm_(state.jem.parameters(), max_norm)
        state.sam.second_step()
    else:
        state.opt.step()
    state.sched.step()
    state.step += 1


# --------------------------------------------------------------------------------------------------------------
# building a run
# --------------------------------------------------------------------------------------------------------------
def batch_streams(cfg: TrainConfig, s: Splits, dist: Dist) -> tuple[BatchStream, Optional[BatchStream]]:
    """The labelled stream and, semi-supervised (labels for a few, p(x) on all training images), the p(x) stream."""
    if cfg.labels_per_class <= 0:
        return BatchStream(s.x_train, s.y_train, cfg.batch_size, cfg.seed, dist.rank, dist.world_size), None
    lab = labeled_subset(s.y_train.cpu(), cfg.labels_per_class, cfg.seed).to(s.x_train.device)
    return (BatchStream(s.x_train[lab], s.y_train[lab], cfg.batch_size, cfg.seed, dist.rank, dist.world_size),
            BatchStream(s.x_train, None, cfg.batch_size, cfg.seed + 1, dist.rank, dist.world_size))


def build_state(cfg: TrainConfig, data: ImageData, dist: Dist, dev: torch.device, rank_seed: int, trust_code: bool):
    """Model (DDP-wrapped for the loss under torch.distributed), sampler, optimiser (+ SAM); the autocast context."""
    jem = build_jem(cfg, data.shape, data.num_classes, trust_code=trust_code).to(dev)
    autocast = speed_settings(cfg, jem, dev, data.shape)
    loss_jem = jem
    if dist.enabled:  # gradients all-reduced once per step; each rank keeps its own share of the replay buffer
        loss_jem = JEM(DistributedDataParallel(jem.f, device_ids=[dev.index] if dev.type == "cuda" else None))
        torch.manual_seed(cfg.seed + rank_seed)  # ranks share the model's seed and differ in everything after it
    sampler_cfg = replace(cfg, buffer_size=max(1, cfg.buffer_size // dist.world_size)) if dist.enabled else cfg
    sampler = build_sampler(sampler_cfg, data.shape, data.num_classes, dev, init_images(cfg, data))
    opt = build_optimizer(cfg, jem.parameters())
    sam = SAM(opt, cfg.sam_rho, cfg.sam_adaptive) if cfg.sam_rho > 0 else None
    return jem, loss_jem, sampler, opt, sam, autocast


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    """In the order they run after a step: the clock first (it may make this step the last), the checkpoint last."""
    adapt = [AdaptivePx(cfg.px_target_reach, cfg.px_scale_min)] if cfg.px_target_reach > 0 else []
    adapt += [AdaptiveSteps(cfg.sgld_steps_max)] if cfg.sgld_steps_max > cfg.sgld_steps else []
    average = [WeightAverage(cfg.ema_decay)] if cfg.ema_decay > 0 else []  # before Validation, which reads it
    return [Timer(cfg.time_limit), *adapt, MetricsWindow(cfg.log_every), Health(cfg), *average, Validation(),
            Curves(), SampleGrids(), Checkpoint(), Interrupt(), FaultInjection(cfg.inject_divergence)]


# --------------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------------
class Trainer:
    """One run: its data streams, ``TrainState``, recovery guard and callbacks; ``fit()`` runs the loop."""

    def __init__(self, cfg: TrainConfig, data: Optional[ImageData] = None, dist: Optional[Dist] = None,
                 callbacks: Optional[list[Callback]] = None, trust_code: bool = True):
        self.cfg, self.dist = cfg, dist or Dist.single()
        if (cfg.grad_surgery or cfg.px_tail_grad != "all") and self.dist.enabled:
            flag = "--grad-surgery" if cfg.grad_surgery else "--px-tail-grad logit-shift"
            raise ValueError(f"{flag} runs in one process only (its two gradients are not all-reduced): drop it or "
                             "train without torchrun")
        self.device = pick_device(self.dist.device(cfg.device))
        self.run, self.rank_seed = RunDir(cfg.run_dir), 7919 * self.dist.rank
        torch.manual_seed(cfg.seed)
        self.data = data if data is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download)
        self.splits = training_splits(self.data, cfg.n_valid, cfg.seed, self.device)
        self.labeled, self.unlabeled = batch_streams(cfg, self.splits, self.dist)
        self.extra = (BatchStream(self.splits.x_train, None, (cfg.px_data_batches - 1) * self.labeled.batch_size,
                                  cfg.seed + 2, self.dist.rank, self.dist.world_size)
                      if cfg.px_data_batches > 1 and cfg.uses_samples else None)  # --px-data-batches' own images
        self.clock = Clock.of(cfg, (self.unlabeled or self.labeled).batches_per_epoch)
        self.phases = Phases.of(cfg, self.clock)
        self.pad, self.flip = (self.data.pad if cfg.augment else 0), (self.data.flip and cfg.augment)
        jem, loss_jem, sampler, opt, sam, self.autocast = build_state(cfg, self.data, self.dist, self.device,
                                                                      self.rank_seed, trust_code)
        # --px-tail-grad logit-shift: the layer whose logit shift the tail's density trains (found once, here)
        self.shift_head = logit_head(jem.f, self.data.num_classes) if cfg.px_tail_grad == "logit-shift" else None
        self.recovery = Recovery(cfg, self.run.checkpoint, self.rank_seed, getattr(sampler.update, "step_size", None))
        schedule = lr_factor(cfg, self.clock.iters_per_epoch, self.clock.total_iters)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.recovery.lr_scale * schedule(step))
        self.state = TrainState(jem, loss_jem, opt, sched, sampler, sam)
        self.callbacks = callbacks if callbacks is not None else default_callbacks(cfg)
        self.timer = next((cb for cb in self.callbacks if isinstance(cb, Timer)), Timer())
        self.events: list[dict] = []  # recovery records of this iteration, written to metrics.jsonl
        self.log, self.tb, self.bar = MetricsLog(self.run / METRICS, enabled=False), None, None
        self.flags: dict[str, str] = {}  # shown beside the progress bar's values (health.py sets "health")
        self.px_scale = 1.0  # the generative terms' scale (health.AdaptivePx sets it; 1: the configured weights)

    # views the callbacks read ---------------------------------------------------------------------------------
    epoch = property(lambda self: self.state.step // self.clock.iters_per_epoch)
    epoch_done = property(lambda self: self.state.step % self.clock.iters_per_epoch == 0)
    last = property(lambda self: self.state.step == self.clock.total_iters)
    time_limited = property(lambda self: self.cfg.time_limit > 0 and self.clock.total_iters < self.clock.planned_iters)

    def say(self, message: str) -> None:
        """A line on stderr (above the progress bar), from rank 0."""
        if self.dist.is_main and self.bar is not None:
            self.bar.write(message, file=sys.stderr)

    def emit(self, event: dict) -> None:
        """A record for metrics.jsonl whose ``message`` also goes to the screen."""
        self.log.write(event)
        self.say(event["message"])

    def call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # one iteration --------------------------------------------------------------------------------------------
    def iteration(self) -> dict:
        """Batch → samples → loss → guard → optimiser step. Returns the step's statistics (``rollback``: 1 when the
        guard rolled the state back instead)."""
        state, cfg = self.state, self.cfg
        state.loss_jem.train()
        batch = training_batch(cfg, self.labeled, self.unlabeled, state.step, self.pad, self.flip, self.extra)
        weights = self.phases.weights(self.recovery.weights, state.step, self.px_scale)
        state.sampler.update.noise = self.phases.chain_std(state.step)
        shift_head = self.shift_head if self.phases.tail(state.step) else None
        stats, loss_fn = forward_backward(state, cfg, batch, weights, self.autocast, shift_head)
        self.call("on_stats", stats)
        values, sound = reduce_stats(stats, cfg.max_energy_gap, self.dist)
        if not sound:  # a divergence: the guard rolls back (recovery.py)
            state.opt.zero_grad(set_to_none=True)
            self.events += self.recovery.recover(state, values)
            return {**values, "rollback": 1.0}
        optimizer_step(state, loss_fn, clip_norm(cfg), sam=cfg.sam_tail or not self.phases.tail(state.step))
        self.events += self.recovery.healthy_step(state)
        return values

    def fit(self) -> dict:
        """Train until ``clock.total_iters``; write metrics, samples, checkpoints; return the summary."""
        self.start()
        try:
            while self.state.step < self.clock.total_iters:
                self.call("on_iteration_start")
                t0 = time.perf_counter()
                values = self.iteration()
                for ev in self.events:
                    self.emit(ev)
                self.events.clear()
                self.timer.add(time.perf_counter() - t0)
                if values.get("rollback"):
                    self.call("on_rollback")
                    self.bar.n = self.state.step
                    continue
                self.bar.update(1)
                shown = {s: f"{values[k]:.3f}" for k, s in POSTFIX.items() if k in values}
                self.bar.set_postfix({**shown, **self.flags}, refresh=False)
                self.call("on_step_end", values)
        finally:
            self.call("on_fit_end")
            self.bar.close()
            self.log.close()
        return self.finish()

    def start(self) -> None:
        """Open the log, TensorBoard and the progress bar (rank 0 alone writes files); first snapshot; callbacks."""
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.run.write_config(cfg)
            self.run.remove_stale_temporaries()
        self.tb = TensorBoardLog(self.run / TENSORBOARD_DIR, self.state.step, self.recovery.count) \
            if cfg.tensorboard and main else None
        self.log = MetricsLog(self.run / METRICS, self.tb, enabled=main)
        self.bar = tqdm(total=self.clock.total_iters, initial=self.state.step, disable=not (cfg.progress and main),
                        dynamic_ncols=True, desc=f"jem {cfg.run_name}", unit="it")
        self.recovery.take_snapshot(self.state)
        self.call("on_fit_start")

    # checkpoints ----------------------------------------------------------------------------------------------
    def full_state(self) -> dict:
        return {**self.state.state_dict(), "recovery": self.recovery.state_dict(), "config": self.cfg.to_dict(),
                "jemtorch_version": __version__,
                "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks if cb.state_dict()},
                "dataset": {"name": self.data.name, "shape": list(self.data.shape), "classes": self.data.classes}}

    def load_full_state(self, state: dict) -> None:
        try:
            self.state.load_state_dict(state)
            self.recovery.load_state_dict(state["recovery"], self.state.sampler)
            saved = callback_states(state, self.clock.iters_per_epoch)
            for cb in self.callbacks:
                if type(cb).__name__ in saved:
                    cb.load_state_dict(saved[type(cb).__name__])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"checkpoint does not match this run's model/config: {str(e).splitlines()[0]}") from None

    def save(self) -> None:
        Checkpoint.save(self)

    def resume(self, changed: Optional[dict] = None) -> None:
        Checkpoint.resume(self, changed)

    def finish(self) -> dict:
        """Test the best-validation model (or the final one without a validation split); write summary.json."""
        return finish(self)


POSTFIX = {"loss": "loss", "l_clf": "clf", "l_pl": "pl", "l_vat": "vat", "l_pxy": "pxy", "train_acc": "acc",
           "energy_gap": "gap", "reach": "reach"}


# the end ----------------------------------------------------------------------------------------------------
def finish(t: Trainer) -> dict:
    """Test the best-validation model (or the final one without a validation split); write summary.json."""
    jem, d = t.state.jem, t.dist
    bad = nonfinite_weights(jem.f)
    if bad:
        raise TrainingDiverged(f"the final weights are not finite ({', '.join(bad[:3])}); no summary was written. "
                               f"The last good checkpoint: {t.run.checkpoint}")
    last = best = accuracy_and_nll(jem, t.splits.x_test, t.splits.y_test, dist=d)
    # rank 0 wrote best.pt; it hands the weights to the others (no shared file system needed)
    best_weights = d.broadcast_object(load_safe(t.run.best, "cpu")["model"] if d.is_main and len(t.splits.x_val)
                                      and t.run.best.exists() else None)
    if best_weights is not None:
        with weights_in(jem.f, best_weights):
            best = accuracy_and_nll(jem, t.splits.x_test, t.splits.y_test, dist=d)
    # every rank must hold the same weights (DDP's promise): checked, not assumed
    fingerprint = float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in jem.f.parameters()))
    in_sync = len(set(d.all_gather_object(fingerprint))) == 1
    summary = run_summary(t, best, last, in_sync)
    if d.is_main:
        t.run.write_summary(summary)
    if not in_sync:
        raise TrainingDiverged("the ranks' weights differ at the end of training (a DDP fault); see summary.json")
    return summary


def run_summary(t: Trainer, best: dict, last: dict, in_sync: bool) -> dict:
    """summary.json: test accuracy of the best-validation and of the last model, time, iterations, health, ..."""
    cfg, d, best_val = t.cfg, t.dist, next((cb.best for cb in t.callbacks if isinstance(cb, Validation)), -1.0)
    summary = {"test_accuracy": best["accuracy"], "test_nll": best["nll"], "test_accuracy_last": last["accuracy"],
               "best_val_accuracy": best_val if best_val >= 0 else None, "train_seconds": round(t.timer.seconds, 2),
               "iterations": t.state.step, "epochs": t.state.step / t.clock.iters_per_epoch,
               "rollbacks": t.recovery.count, "time_limited": t.time_limited, "recipe": cfg.recipe,
               "dataset": cfg.dataset, "model": cfg.model, "num_params": sum(p.numel() for p in t.state.jem.parameters()),
               "p_x_weight": cfg.p_x_weight, "device": str(t.device), "torch": torch.__version__,
               "host": platform.node(), "world_size": d.world_size, "global_batch": cfg.batch_size * d.world_size}
    for cb in t.callbacks:
        summary.update(getattr(cb, "summary", lambda: {})())
    if d.enabled:
        summary["ranks_in_sync"] = in_sync
    return summary


def train(cfg: TrainConfig, resume: bool = False, data: Optional[ImageData] = None) -> dict:
    """Train a JEM as configured; with ``resume=True`` continue from ``cfg.run_dir``'s checkpoint."""
    trainer = Trainer(cfg, data)
    if resume:
        trainer.resume()
    return trainer.fit()

