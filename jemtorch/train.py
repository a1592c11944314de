"""JEM training (Algorithm 1 of Grathwohl et al. 2020): one readable loop.

One iteration, following one batch:
    x, y      ← labelled batch from the device-resident dataset, augmented on the device (+ σ_data noise)
    x_px      ← (semi-supervised) a batch of the full, mostly unlabelled training set; else x itself
    x̂         ← sampler: replay buffer → K chain steps on log p(x) (parameters frozen) → written back
    loss      ← objective.jem_loss(jem, x, y, x_px, x̂, x̂_y)         (a pure function: see objective.py)
    optimiser step; warm-up and step decay of the learning rate.

The p(x) term equals the energy gap E(data) − E(samples): near 0 is healthy, large |gap| means the sampler has
lost track of the model. A step whose loss is non-finite or whose |gap| exceeds ``max_energy_gap`` is a
divergence: the step is not applied and the run recovers by the ladder in ``Recovery`` (roll back to an earlier
snapshot, re-seed, lower the lr, refresh part of the buffer, raise the energy penalty, shrink the sampler's step),
never restoring the same state twice. The official code stops with ``1/0`` at the first divergence.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_safe, rng_state, set_rng_state
from .config import TrainConfig
from .data import BatchStream, ImageData, augment, labeled_subset, load_dataset, to_float, training_splits
from .distributed import Dist
from .energy import JEM, eval_mode, in_batches
from .figures import buffer_grids, training_curves
from .objective import Weights, jem_loss
from .optim import SAM, build_optimizer, lr_factor
from .run import (
    CURVES,
    LATEST_SAMPLES,
    METRICS,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    MetricsLog,
    RunDir,
    TensorBoardLog,
    build_jem,
    init_images,
    pick_device,
)
from .sampler import ReplayBuffer, build_sampler, running_stats_frozen

CURVES_EVERY_S = 30.0  # the training-curves figure is redrawn after an epoch at most this often (and at the end)


class TrainingDiverged(RuntimeError):
    pass


@torch.no_grad()
def accuracy_and_nll(jem: JEM, x_u8: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
                     dist: Optional[Dist] = None) -> dict:
    """Accuracy and NLL of p(y|x) on uint8 images (no augmentation, no noise). Under torch.distributed every rank
    scores its shard (every world_size-th image) and the sums are all-reduced: the numbers of one process."""
    dist = dist or Dist.single()
    if len(x_u8) == 0:
        return {"accuracy": 0.0, "nll": 0.0}
    xs, ys = (x_u8[dist.rank :: dist.world_size], y[dist.rank :: dist.world_size]) if dist.enabled else (x_u8, y)
    with eval_mode(jem):
        logits = in_batches(lambda xb: jem(to_float(xb)), xs, batch_size) if len(xs) else torch.zeros(0, 1)
    if not dist.enabled:
        return {"accuracy": (logits.argmax(1) == y).float().mean().item(), "nll": F.cross_entropy(logits, y).item()}
    sums = torch.tensor([(logits.argmax(1) == ys).sum().item(), F.cross_entropy(logits, ys, reduction="sum").item()
                         if len(xs) else 0.0, len(xs)], dtype=torch.float64, device=x_u8.device)
    correct, nll, n = dist.all_reduce_sum(sums).tolist()
    return {"accuracy": correct / n, "nll": nll / n}


class Recovery:
    """Divergence recovery: snapshots of the healthy run and a ladder of escalating actions.

    Every ``snapshot_every`` healthy iterations, model, optimiser and replay buffer are copied in memory (the last
    ``snapshots_kept``). At a divergence the step is dropped and the run goes back to the newest snapshot; a
    snapshot is used once, so a divergence soon after a rollback (within 2·snapshot_every healthy iterations) goes
    further back and climbs one rung of the ladder, while a divergence after a healthy stretch starts again at rung 1:

      1. restore, re-seed the random number generators, lr ×0.5 (the lr doubles back after each healthy stretch)
      2. + restart 10% of the replay buffer from the initial distribution
      3. + raise the energy penalty λ·(E(data)² + E(samples)²) to max(0.1, 2λ) (JEM issues #4/#8: "energy L2 ≈ 0.1")
      4. + halve the sampler's step size

    Past rung 4, with no snapshot left, or after ``max_rollbacks`` recoveries, the run stops with TrainingDiverged.
    Each action is returned as a ``recovery`` record (metrics.jsonl) with a one-line message (the screen).
    """

    RUNGS = 4
    REFRESH = 0.1

    def __init__(self, trainer: Trainer):
        self.t = trainer
        cfg = trainer.cfg
        self.snapshots: list[dict] = []
        self.count = 0  # recoveries so far
        self.level = 0  # rung of the last recovery
        self.healthy = 0  # healthy iterations since the last recovery
        self.lr_scale = 1.0
        self.energy_reg = cfg.energy_reg
        self.raised_energy_reg: Optional[float] = None  # set by rung 3; a resumed run keeps it over its config
        self.sampler_scale = 1.0
        self.base_step = getattr(trainer.sampler.update, "step_size", None)

    @property
    def weights(self) -> Weights:
        return replace(Weights.from_config(self.t.cfg), energy_reg=self.energy_reg)

    def take_snapshot(self) -> None:
        t = self.t
        self.snapshots.append({"model": {k: v.detach().clone() for k, v in t.jem.f.state_dict().items()},
                               "optimizer": copy.deepcopy(t.opt.state_dict()), "buffer": t.buffer.data.clone(),
                               "step": t.step})
        self.snapshots = self.snapshots[-t.cfg.snapshots_kept:]

    def healthy_step(self) -> list[dict]:
        """Called after every applied step: snapshots, and the lr creeping back after a healthy stretch."""
        t, cfg, events = self.t, self.t.cfg, []
        self.healthy += 1
        if t.step % cfg.snapshot_every == 0:
            self.take_snapshot()
        if self.lr_scale < 1.0 and self.healthy % cfg.snapshot_every == 0:
            self.lr_scale = min(1.0, 2 * self.lr_scale)
            events.append({"kind": "recovery", "step": t.step, "action": "lr", "lr_scale": self.lr_scale,
                           "message": f"recovery: {cfg.snapshot_every} healthy iterations, lr back to ×{self.lr_scale:g}"})
        return events

    def recover(self, values: dict) -> list[dict]:
        t, cfg = self.t, self.t.cfg
        soon = self.count > 0 and self.healthy < 2 * cfg.snapshot_every
        level = self.level + 1 if soon else 1
        gap = values.get("energy_gap", float("nan"))
        if self.count >= cfg.max_rollbacks or level > self.RUNGS or not self.snapshots:
            why = ("no earlier snapshot is left" if not self.snapshots else
                   f"{self.count} recoveries (--max-rollbacks {cfg.max_rollbacks})" if self.count >= cfg.max_rollbacks
                   else f"{self.RUNGS} recoveries in quick succession")
            where = t.run.checkpoint if t.run.checkpoint.exists() else "none written yet"
            raise TrainingDiverged(
                f"training diverged at iteration {t.step} and cannot recover ({why}): non-finite loss or |energy gap| > "
                f"{cfg.max_energy_gap:g} (gap {gap:.4g}, loss {values['loss']:.4g}). Last checkpoint: {where}; try "
                f"--energy-reg 0.1, a lower --lr, more --warmup-iters or a smaller --sgld-lr.")
        failed_at = t.step
        snap = self.snapshots.pop()  # used once: a state that led to divergence is never restored again
        t.jem.f.load_state_dict(snap["model"])
        t.opt.load_state_dict(snap["optimizer"])
        t.buffer.data = snap["buffer"].clone()
        t.step = snap["step"]
        self.count += 1
        self.level = level
        self.healthy = 0
        torch.manual_seed(cfg.seed + 1_000_003 * self.count + t.rank_seed)  # a new trajectory from the restored state
        self.lr_scale *= 0.5
        actions = [f"rolled back to iteration {t.step}", "re-seeded", f"lr ×{self.lr_scale:g}"]
        if level >= 2:
            n = t.buffer.refresh(self.REFRESH)
            actions.append(f"restarted {n} buffer chains from the initial distribution")
        if level >= 3:
            self.energy_reg = self.raised_energy_reg = max(0.1, 2 * self.energy_reg)
            actions.append(f"energy penalty {self.energy_reg:g}")
        if level >= 4 and self.base_step is not None:
            self.sampler_scale *= 0.5
            self.apply_sampler_scale()
            actions.append(f"sampler step ×{self.sampler_scale:g}")
        t.sched.last_epoch = t.step - 1
        t.sched.step()  # the lr of the restored step with the new scale
        return [{"kind": "rollback", "step": t.step, "diverged_at": failed_at, "rung": level, "energy_gap": gap,
                 "loss": values["loss"], "lr_scale": self.lr_scale, "energy_reg": self.energy_reg,
                 "sampler_scale": self.sampler_scale,
                 "message": f"divergence at iteration {failed_at} (gap {gap:.4g}); rung {level}: " + ", ".join(actions)}]

    def apply_sampler_scale(self) -> None:
        if self.base_step is not None:
            self.t.sampler.update.step_size = self.base_step * self.sampler_scale

    def state_dict(self) -> dict:
        return {"count": self.count, "level": self.level, "healthy": self.healthy, "lr_scale": self.lr_scale,
                "raised_energy_reg": self.raised_energy_reg, "sampler_scale": self.sampler_scale}

    def load_state_dict(self, state: dict) -> None:
        """Restore the ladder's state; the config's own energy penalty (which a resume may change) is kept unless
        the ladder had raised it above that."""
        self.count, self.level, self.healthy = int(state["count"]), int(state["level"]), int(state["healthy"])
        self.lr_scale, self.sampler_scale = float(state["lr_scale"]), float(state["sampler_scale"])
        raised = state.get("raised_energy_reg")
        self.raised_energy_reg = None if raised is None else float(raised)
        self.energy_reg = max(self.t.cfg.energy_reg, self.raised_energy_reg or 0.0)
        self.apply_sampler_scale()


class Trainer:
    """Holds the model, sampler, optimiser and data streams of one run; ``fit()`` runs the loop."""

    def __init__(self, cfg: TrainConfig, data: Optional[ImageData] = None, dist: Optional[Dist] = None):
        self.cfg = cfg
        self.dist = dist = dist or Dist.single()
        self.device = dev = pick_device(dist.device(cfg.device))
        self.run = RunDir(cfg.run_dir)
        self.rank_seed = 7919 * dist.rank  # ranks share the model's seed and differ in everything sampled after it
        torch.manual_seed(cfg.seed)

        # --- data: whole dataset as uint8 tensors on the device ---
        self.data = data = data if data is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download)
        self.splits = s = training_splits(data, cfg.n_valid, cfg.seed, dev)
        if cfg.labels_per_class > 0:  # semi-supervised: labels for a few, p(x) on all training images
            lab = labeled_subset(s.y_train.cpu(), cfg.labels_per_class, cfg.seed).to(dev)
            self.labeled = BatchStream(s.x_train[lab], s.y_train[lab], cfg.batch_size, cfg.seed, dist.rank,
                                       dist.world_size)
            self.unlabeled: Optional[BatchStream] = BatchStream(s.x_train, None, cfg.batch_size, cfg.seed + 1,
                                                                dist.rank, dist.world_size)
        else:
            self.labeled = BatchStream(s.x_train, s.y_train, cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
            self.unlabeled = None
        self.iters_per_epoch = (self.unlabeled or self.labeled).batches_per_epoch
        self.total_iters = cfg.epochs * self.iters_per_epoch
        if cfg.max_iters >= 0:
            self.total_iters = min(self.total_iters, cfg.max_iters)
        self.planned_iters = self.total_iters  # --time-limit may end the run sooner (total_iters is then lowered)
        self.pad = data.pad if cfg.augment else 0
        self.flip = data.flip and cfg.augment

        # --- model, sampler, optimiser ---
        self.jem = build_jem(cfg, data.shape, data.num_classes).to(dev)
        self.autocast = speed_settings(cfg, self.jem, dev, data.shape)
        self.uses_samples = cfg.uses_samples
        self.loss_jem = self.jem  # what the loss runs through: the DDP wrapper under torch.distributed
        if dist.enabled:
            # the loss goes through DDP (gradients all-reduced once per step); sampling uses the unwrapped self.jem,
            # so the K sampler steps cost no communication. Each rank keeps its own share of the replay buffer.
            self.loss_jem = JEM(DistributedDataParallel(self.jem.f, device_ids=[dev.index] if dev.type == "cuda"
                                                        else None))
            torch.manual_seed(cfg.seed + self.rank_seed)
        sampler_cfg = replace(cfg, buffer_size=max(1, cfg.buffer_size // dist.world_size)) if dist.enabled else cfg
        self.sampler = build_sampler(sampler_cfg, data.shape, data.num_classes, dev, init_images(cfg, data))
        self.opt = build_optimizer(cfg, self.jem.parameters())
        self.sam = SAM(self.opt, cfg.sam_rho, cfg.sam_adaptive) if cfg.sam_rho > 0 else None
        self.schedule = lr_factor(cfg, self.iters_per_epoch, self.total_iters)
        self.recovery = Recovery(self)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.step = 0
        self.best_val = -1.0
        self.train_seconds = 0.0
        self.epoch_started_at: Optional[float] = 0.0  # training seconds at the start of this epoch (None: unknown)
        self.events: list[dict] = []  # recovery records, written to metrics.jsonl
        self.window: dict[str, list[float]] = {}  # per-step values averaged into the next log record
        self.injected: set[int] = set()  # --inject-divergence steps already used

    @property
    def buffer(self) -> ReplayBuffer:
        return self.sampler.buffer

    @property
    def rollbacks(self) -> int:
        return self.recovery.count

    @property
    def lr_scale(self) -> float:
        return self.recovery.lr_scale

    def lr_factor(self, step: int) -> float:
        return self.recovery.lr_scale * self.schedule(step)

    # ---------------------------------------------------------------------------------------------------------
    def batches(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """This step's labelled batch (augmented) and, when it is not the labelled batch itself, the p(x) batch."""
        cfg = self.cfg
        x_u8, y = self.labeled.batch(self.step)
        x = augment(to_float(x_u8), self.pad, self.flip, cfg.data_noise)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n_px = cfg.px_batch_size if cfg.px_batch_size > 0 else len(x)
        if not self.uses_samples or (self.unlabeled is None and cfg.px_augment and n_px >= len(x)):
            return x, y, None
        if self.unlabeled is None and cfg.px_augment:
            return x, y, x[:n_px]
        px_u8 = (self.unlabeled.batch(self.step)[0] if self.unlabeled is not None else x_u8)[:n_px]
        if cfg.px_augment:
            return x, y, augment(to_float(px_u8), self.pad, self.flip, cfg.data_noise)
        return x, y, augment(to_float(px_u8), 0, False, cfg.data_noise)  # SADA-JEM: p(x) on un-augmented images

    @property
    def px_start_iter(self) -> int:
        """The first iteration of the generative terms (--px-start-epoch)."""
        return self.cfg.px_start_epoch * self.iters_per_epoch

    @property
    def generative(self) -> bool:
        """Do the generative terms train at this step (on, and past ``px_start_epoch``)?"""
        return self.uses_samples and self.step >= self.px_start_iter

    def train_step(self) -> dict:
        """One iteration of Algorithm 1. Returns the step's statistics as Python floats (one host sync)."""
        cfg = self.cfg
        self.loss_jem.train()
        x, y, x_px = self.batches()
        weights = self.recovery.weights
        samples = samples_y = None
        if not self.generative:  # --px-start-epoch: a classifier step
            weights, x_px = replace(weights, px=0.0, pxy=0.0), None
        elif cfg.px_ramp_iters > 0:  # --px-ramp-iters: the generative part of the loss fades in
            into = self.step - self.px_start_iter + 1
            if into < cfg.px_ramp_iters:
                r = into / cfg.px_ramp_iters
                weights = replace(weights, px=r * weights.px, pxy=r * weights.pxy, energy_reg=r * weights.energy_reg)
        with self.autocast():  # --amp bf16: the network's forward passes; the chains themselves stay fp32
            if weights.px > 0:
                samples = self.sampler.sample(self.jem, len(x_px) if x_px is not None else len(x))  # x̂ ~ p(x)
            if weights.pxy > 0:
                samples_y = self.sampler.sample(self.jem, len(x), y=y)  # x̂_y ~ p(x|y)

        def loss_fn() -> tuple[torch.Tensor, dict]:
            with self.autocast():
                return jem_loss(self.loss_jem, x, y, weights=weights, x_px=x_px, samples=samples,
                                samples_y=samples_y, separate=cfg.separate_forward)

        loss, stats = loss_fn()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.jem.parameters(), max_norm)
        if samples is not None and self.sampler.grad_norm is not None:
            stats["sgld_grad_norm"] = self.sampler.grad_norm
        if self.step in cfg.inject_divergence and self.step not in self.injected:  # fault injection, on rank 0
            self.injected.add(self.step)
            if self.dist.is_main:
                stats["energy_gap"] = torch.tensor(float("inf"), device=self.device)
            elif "energy_gap" not in stats:
                stats["energy_gap"] = torch.zeros((), device=self.device)
        names = list(stats)
        vec = torch.stack([stats[k].detach().float() for k in names])
        gap = stats.get("energy_gap")
        bad = ~torch.isfinite(vec).all() | (gap.detach().abs() > cfg.max_energy_gap if gap is not None else False)
        # one host sync; under torch.distributed one all-reduce: the statistics are means over ranks and a divergence
        # on any rank (a non-finite value or a runaway gap there) is seen by all, which all roll back together
        *means, n_bad = self.dist.all_reduce_mean(torch.cat([vec, bad.float().view(1)])).tolist()
        values = dict(zip(names, means))

        healthy = n_bad == 0 and all(math.isfinite(v) for v in values.values())
        if not healthy:
            self.opt.zero_grad(set_to_none=True)
            self.events += self.recovery.recover(values)
            values["rollback"] = 1.0
            return values
        if self.sam is not None:  # SAM: the gradient at the sharpest nearby weights, same batches and samples
            self.sam.first_step()
            with running_stats_frozen(self.jem):
                loss_fn()[0].backward()
            torch.nn.utils.clip_grad_norm_(self.jem.parameters(), max_norm)
            self.sam.second_step()
        else:
            self.opt.step()
        self.sched.step()
        self.step += 1
        self.events += self.recovery.healthy_step()
        return values

    # ---------------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until ``total_iters``; write metrics, samples, checkpoints; return the summary."""
        cfg, main = self.cfg, self.dist.is_main  # rank 0 alone writes files
        if main:
            self.run.write_config(cfg)
            self.run.remove_stale_temporaries()
        tb = TensorBoardLog(self.run / TENSORBOARD_DIR, self.step, self.rollbacks) if cfg.tensorboard and main else None
        log = MetricsLog(self.run / METRICS, tb, enabled=main)
        sample_every = cfg.sample_every if cfg.sample_every > 0 else 10 * self.iters_per_epoch
        window = self.window  # values since the last log record (checkpointed: a resumed run logs the same)
        bar = tqdm(total=self.total_iters, initial=self.step, disable=not (cfg.progress and main), dynamic_ncols=True,
                   desc=f"jem {cfg.run_name}", unit="it")
        t_last, curves_drawn = time.perf_counter(), -math.inf  # the first epoch's figure is drawn at once
        self.recovery.take_snapshot()
        try:
            with deferred_interrupt(lambda: main and bar.write("interrupt: finishing this iteration, then saving a "
                                                               "checkpoint (Ctrl-C again stops at once; the last "
                                                               "checkpoint stays)")) as stop:
                while self.step < self.total_iters:
                    if self.dist.enabled:  # every rank stops at the same iteration, or none does
                        stop.asked = self.dist.all_reduce_sum(torch.tensor([float(stop.asked)], device=self.device)).item() > 0
                    if stop.asked:  # between iterations the state is whole: save it, then stop
                        self.save()
                        raise KeyboardInterrupt
                    values = self.train_step()
                    for ev in self.events:
                        log.write(ev)
                        if main:  # every rank sees the same events; one prints them
                            bar.write(ev["message"])
                    self.events.clear()
                    if values.get("rollback"):
                        window.clear()
                        bar.n = self.step
                        continue
                    for k, v in values.items():
                        window.setdefault(k, []).append(v)
                    bar.update(1)
                    bar.set_postfix(_postfix(values), refresh=False)
                    # validation and logging happen at fixed steps only, so a stopped-and-resumed run logs and selects
                    # its best checkpoint exactly as an uninterrupted one
                    epoch_done = self.step % self.iters_per_epoch == 0
                    now = time.perf_counter()
                    self.train_seconds += now - t_last
                    t_last = now
                    if cfg.time_limit > 0 and self.step < self.total_iters and self.out_of_time(epoch_done):
                        self.total_iters = self.step  # --time-limit: this iteration is the last
                        ev = {"kind": "time_limit", "step": self.step, "epoch": self.step / self.iters_per_epoch,
                              "time": round(self.train_seconds, 3), "message": f"time limit: stopping at iteration "
                              f"{self.step} (epoch {self.step / self.iters_per_epoch:.2f}) after "
                              f"{self.train_seconds:.0f} s of training (--time-limit {cfg.time_limit:g})"}
                        log.write(ev)
                        if main:
                            bar.write(ev["message"])
                    last = self.step == self.total_iters

                    if self.step % cfg.log_every == 0:
                        rec = {"kind": "train", "step": self.step, "epoch": self.step / self.iters_per_epoch,
                               "lr": self.opt.param_groups[0]["lr"], "time": round(self.train_seconds, 3)}
                        rec.update({k: sum(v) / len(v) for k, v in window.items()})
                        log.write(rec)
                        window.clear()
                    # a mid-epoch end is validated only when the time limit chose it (a --max-iters stop is a pause
                    # that a resume continues, and must log exactly what an uninterrupted run logs)
                    if (epoch_done and ((self.step // self.iters_per_epoch) % cfg.eval_every == 0 or last)) or \
                            (last and self.time_limited):
                        self.validate(log)
                    # the figure costs ~1.4 s to draw: after every epoch, but not more often than every
                    # CURVES_EVERY_S seconds (digits' epochs last ~6 s), and always at the end
                    if main and (last or (epoch_done and now - curves_drawn >= CURVES_EVERY_S)):
                        training_curves(log.records(), self.run / CURVES)
                        curves_drawn = time.perf_counter()
                    if self.uses_samples and (self.step % sample_every == 0 or last) and main:
                        self.write_samples(tb)
                    if (epoch_done and (self.step // self.iters_per_epoch) % cfg.ckpt_every == 0) or last:
                        self.save()
                    t_last = time.perf_counter()  # bookkeeping above is not training time
        finally:
            bar.close()
            log.close()
        return self.finish()

    @property
    def time_limited(self) -> bool:
        """Did --time-limit end this run before its epochs?"""
        return self.cfg.time_limit > 0 and self.total_iters < self.planned_iters

    def out_of_time(self, epoch_done: bool) -> bool:
        """--time-limit: stop now? At an epoch's end, when one more epoch, as long as the longer of the mean and the
        last epoch, would not fit; within an epoch, once the budget is spent. Under torch.distributed the ranks agree
        (any rank's 'yes': one all-reduce per iteration while a limit is set)."""
        spent, limit = self.train_seconds, self.cfg.time_limit
        up = spent >= limit
        if epoch_done:  # the next epoch is predicted to last as long as the longest of: the mean one, the last one
            mean = spent / (self.step / self.iters_per_epoch)
            last = spent - self.epoch_started_at if self.epoch_started_at is not None else 0.0
            up = up or spent + max(mean, last) > limit
            self.epoch_started_at = spent
        if self.dist.enabled:
            up = self.dist.all_reduce_sum(torch.tensor([float(up)], device=self.device)).item() > 0
        return up

    def validate(self, log: MetricsLog) -> None:
        """Validation accuracy/NLL into the log; a new best is saved as ``best.pt``."""
        s = self.splits
        if len(s.x_val) == 0:
            return
        ev = accuracy_and_nll(self.jem, s.x_val, s.y_val, dist=self.dist)
        log.write({"kind": "eval", "step": self.step, "epoch": self.step / self.iters_per_epoch,
                   "val_accuracy": ev["accuracy"], "val_nll": ev["nll"]})
        # a JEM's best model is chosen among JEM epochs only, never among the classifier-only epochs before
        # --px-start-epoch
        if ev["accuracy"] > self.best_val and (self.generative or not self.uses_samples):
            self.best_val = ev["accuracy"]
            if self.dist.is_main:
                self.run.save_best({"model": self.jem.f.state_dict(), "step": self.step, "val_accuracy": ev["accuracy"],
                                "config": self.cfg.to_dict()})

    def finish(self) -> dict:
        """Test the best-validation model (or the final one without a validation split); write summary.json."""
        s = self.splits
        bad = [n for n, p in self.jem.f.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(f"the final weights are not finite ({', '.join(bad[:3])}); no summary was written. "
                                   f"The last good checkpoint: {self.run.checkpoint}")
        d = self.dist
        last = accuracy_and_nll(self.jem, s.x_test, s.y_test, dist=d)
        best = last
        # rank 0 wrote best.pt; it hands the weights to the others (no shared file system needed)
        best_weights = d.broadcast_object(load_safe(self.run.best, "cpu")["model"] if d.is_main and len(s.x_val) > 0
                                          and self.run.best.exists() else None)
        if best_weights is not None:
            final_state = {k: v.clone() for k, v in self.jem.f.state_dict().items()}
            self.jem.f.load_state_dict(best_weights)
            best = accuracy_and_nll(self.jem, s.x_test, s.y_test, dist=d)
            self.jem.f.load_state_dict(final_state)
        # every rank must hold the same weights (DDP's promise): checked, not assumed
        fingerprint = float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in self.jem.f.parameters()))
        in_sync = len(set(d.all_gather_object(fingerprint))) == 1
        summary = {
            "test_accuracy": best["accuracy"],
            "test_nll": best["nll"],
            "test_accuracy_last": last["accuracy"],
            "best_val_accuracy": self.best_val if self.best_val >= 0 else None,
            "train_seconds": round(self.train_seconds, 2),
            "iterations": self.step,
            "epochs": self.step / self.iters_per_epoch,
            "rollbacks": self.rollbacks,
            "time_limited": self.time_limited,
            "recipe": self.cfg.recipe,
            "dataset": self.cfg.dataset,
            "model": self.cfg.model,
            "num_params": sum(p.numel() for p in self.jem.parameters()),
            "p_x_weight": self.cfg.p_x_weight,
            "device": str(self.device),
            "torch": torch.__version__,
            "host": platform.node(),
            "world_size": d.world_size,
            "global_batch": self.cfg.batch_size * d.world_size,
        }
        if d.enabled:
            summary["ranks_in_sync"] = in_sync
        if d.is_main:
            self.run.write_summary(summary)
        if not in_sync:
            raise TrainingDiverged("the ranks' weights differ at the end of training (a DDP fault); see summary.json")
        return summary

    def write_samples(self, tb: Optional[TensorBoardLog] = None) -> None:
        """Replay-buffer grids for this step (see figures.buffer_grids), also into TensorBoard when it is on."""
        latest = tuple(self.run / n for n in LATEST_SAMPLES)
        buffer_grids(self.buffer.data, self.jem, self.data.num_classes, self.buffer.class_conditional, self.step,
                     self.run / SAMPLES_DIR, latest)
        if tb is not None:
            tb.image("samples/unconditional", latest[0], self.step)
            tb.image("samples/by_class", latest[1], self.step)

    # ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.jem.f.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "buffer": self.buffer.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "best_val": self.best_val,
            "train_seconds": self.train_seconds,
            "recovery": self.recovery.state_dict(),
            "injected": sorted(self.injected),
            "window": {k: list(v) for k, v in self.window.items()},
            "config": self.cfg.to_dict(),
            "dataset": {"name": self.data.name, "shape": list(self.data.shape), "classes": self.data.classes},
        }

    def save(self) -> None:
        """The checkpoint. Under torch.distributed (a collective: every rank calls it at the same step) it holds every
        rank's buffer and RNG state (``ranks``) and, as ``buffer``, all buffers concatenated; rank 0 writes it."""
        state = self.state_dict()
        if self.dist.enabled:
            parts = self.dist.all_gather_object({"buffer": {k: v.cpu() for k, v in state["buffer"].items()},
                                                 "rng": state["rng"]})
            state["ranks"] = {"world_size": self.dist.world_size, "buffers": [p["buffer"] for p in parts],
                              "rng": [p["rng"] for p in parts]}
            state["buffer"] = {"data": torch.cat([p["buffer"]["data"] for p in parts])}
        if self.dist.is_main:
            self.run.save_checkpoint(state)
        self.dist.barrier()

    def rank_state(self, state: dict) -> Optional[str]:
        """Put this rank's replay buffer and RNG state into ``state`` (in place). Same world size as the checkpoint:
        each rank gets its own back, exactly. Another world size: the saved buffers are pooled and dealt out again
        (every world_size-th chain), RNG states seeded afresh; returns a message saying so."""
        d, ranks = self.dist, state.get("ranks")
        saved_world = int(ranks["world_size"]) if isinstance(ranks, dict) else 1
        if saved_world == d.world_size:
            if d.enabled:
                state["buffer"], state["rng"] = ranks["buffers"][d.rank], ranks["rng"][d.rank]
            return None
        pooled = state["buffer"]["data"]
        mine = pooled[d.rank :: d.world_size][: len(self.buffer.data)].to(self.device)
        if len(mine) < len(self.buffer.data):  # fewer saved chains than this rank holds: the rest start afresh
            mine = torch.cat([mine, self.buffer.init.sample(len(self.buffer.data) - len(mine))])
        state["buffer"] = {"data": mine}
        torch.manual_seed(self.cfg.seed + self.rank_seed + int(state["step"]))
        state["rng"] = rng_state()
        return (f"checkpoint written by {saved_world} process(es), resumed by {d.world_size}: the {len(pooled)} saved "
                f"chains were dealt out again ({len(mine)} per process) and the random streams re-seeded, so this "
                f"resume does not reproduce an uninterrupted run")

    def load_state_dict(self, state: dict) -> None:
        try:
            self.jem.f.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.buffer.load_state_dict(state["buffer"])
            set_rng_state(state["rng"])
            self.step = int(state["step"])
            self.best_val = float(state["best_val"])
            self.train_seconds = float(state["train_seconds"])
            self.epoch_started_at = self.train_seconds if self.step % self.iters_per_epoch == 0 else None
            self.recovery.load_state_dict(state["recovery"])
            self.injected = set(int(i) for i in state.get("injected", []))
            self.window = {str(k): [float(v) for v in vs] for k, vs in state.get("window", {}).items()}
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"checkpoint does not match this run's model/config: {str(e).splitlines()[0]}") from None

    def resume(self, changed: Optional[dict] = None) -> None:
        """Load ``RUN_DIR/checkpoint.pt`` and drop metrics logged after it, so the log reads like one run.

        ``changed``: config entries given new values for this resume ({name: [old, new]}, see
        ``config.resume_changes``). The optimiser's own hyper-parameters (lr, momentum, weight decay) come back from
        the checkpoint, so they are set again from the config here; everything else is read from the config at
        every step. The change is logged as a ``kind: resume`` record."""
        d = self.dist
        state = load_safe(self.run.checkpoint, self.device) if not d.enabled else d.broadcast_object(
            load_safe(self.run.checkpoint, "cpu") if d.is_main else None)  # rank 0 reads, hands it to the others
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.run.checkpoint} is not a jemtorch checkpoint (it holds a "
                                  f"{type(state).__name__})")
        note = self.rank_state(state)
        self.load_state_dict(state)
        if note and d.is_main:
            print(f"jem train: {note}", file=sys.stderr)
        for group in self.opt.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["weight_decay"] = self.cfg.weight_decay
            if "momentum" in group:
                group["momentum"] = self.cfg.momentum
        self.sched.base_lrs = [self.cfg.lr for _ in self.opt.param_groups]
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * self.lr_factor(self.sched.last_epoch)
        if not d.is_main:
            return
        log = MetricsLog(self.run / METRICS)
        log.truncate_after(self.step)
        if changed:
            log.write({"kind": "resume", "step": self.step, "changed": changed,
                       "message": "resumed with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())})
            log.close()


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


class _Interrupt:
    asked = False


@contextlib.contextmanager
def deferred_interrupt(notice: Callable[[], None]) -> Iterator[_Interrupt]:
    """Ctrl-C (SIGINT) inside the block only sets ``asked``: the loop finishes its iteration, saves a checkpoint of a
    whole state and stops (an interrupt in the middle of a step would save half a step: buffer and RNG advanced,
    weights not). A second Ctrl-C raises KeyboardInterrupt at once; the last checkpoint on disk stays intact."""
    flag = _Interrupt()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield flag
        return

    def handler(signum, frame):
        if flag.asked:
            raise KeyboardInterrupt
        flag.asked = True
        notice()

    # under torchrun, Ctrl-C reaches the launcher, which passes SIGTERM on to the workers: treated alike
    signals = [signal.SIGINT] + ([signal.SIGTERM] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else [])
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _postfix(values: dict) -> dict:
    short = {"loss": "loss", "l_clf": "clf", "l_pxy": "pxy", "train_acc": "acc", "energy_gap": "gap"}
    return {s: f"{values[k]:.3f}" for k, s in short.items() if k in values}


def train(cfg: TrainConfig, resume: bool = False, data: Optional[ImageData] = None) -> dict:
    """Train a JEM as configured; with ``resume=True`` continue from ``cfg.run_dir``'s checkpoint."""
    trainer = Trainer(cfg, data)
    if resume:
        trainer.resume()
    return trainer.fit()
