"""JEM training (Algorithm 1 of Grathwohl et al. 2020): one readable loop.

One iteration, following one batch:
    x, y      ← labelled batch from the device-resident dataset, augmented on the device (+ σ_data noise)
    x_px      ← (semi-supervised) a batch of the full, mostly unlabelled training set; else x itself
    x̂         ← sampler: replay buffer → K chain steps on log p(x) (parameters frozen) → written back
    loss      ← objective.jem_loss(jem, x, y, x_px, x̂, x̂_y)         (a pure function: see objective.py)
    optimiser step; warm-up and step decay of the learning rate.

The p(x) term equals the energy gap E(data) − E(samples): near 0 is healthy, large |gap| means the sampler has
lost track of the model. A step whose loss is non-finite or whose |gap| exceeds ``max_energy_gap`` is a
divergence: the step is not applied, model, optimiser and replay buffer roll back to the last in-memory snapshot
(taken every ``snapshot_every`` healthy steps) and the learning rate is halved. After
``max_rollbacks`` of these the run stops with TrainingDiverged (the official code stops with ``1/0`` at once).
"""
from __future__ import annotations

import copy
import math
import platform
import time
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_safe, rng_state, set_rng_state
from .config import TrainConfig
from .data import BatchStream, ImageData, augment, labeled_subset, load_dataset, to_float, training_splits
from .energy import JEM, eval_mode, in_batches
from .figures import buffer_grids
from .objective import Weights, jem_loss
from .optim import build_optimizer, lr_factor
from .run import LATEST_SAMPLES, METRICS, SAMPLES_DIR, MetricsLog, RunDir, build_jem, pick_device
from .sampler import ReplayBuffer, build_sampler


class TrainingDiverged(RuntimeError):
    pass


@torch.no_grad()
def accuracy_and_nll(jem: JEM, x_u8: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict:
    """Accuracy and NLL of p(y|x) on uint8 images (no augmentation, no noise)."""
    if len(x_u8) == 0:
        return {"accuracy": 0.0, "nll": 0.0}
    with eval_mode(jem):
        logits = in_batches(lambda xb: jem(to_float(xb)), x_u8, batch_size)
    return {"accuracy": (logits.argmax(1) == y).float().mean().item(), "nll": F.cross_entropy(logits, y).item()}


class Trainer:
    """Holds the model, sampler, optimiser and data streams of one run; ``fit()`` runs the loop."""

    def __init__(self, cfg: TrainConfig, data: Optional[ImageData] = None):
        self.cfg = cfg
        self.device = dev = pick_device(cfg.device)
        self.run = RunDir(cfg.run_dir)
        torch.manual_seed(cfg.seed)

        # --- data: whole dataset as uint8 tensors on the device ---
        self.data = data = data if data is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download)
        self.splits = s = training_splits(data, cfg.n_valid, cfg.seed, dev)
        if cfg.labels_per_class > 0:  # semi-supervised: labels for a few, p(x) on all training images
            lab = labeled_subset(s.y_train.cpu(), cfg.labels_per_class, cfg.seed).to(dev)
            self.labeled = BatchStream(s.x_train[lab], s.y_train[lab], cfg.batch_size, cfg.seed)
            self.unlabeled: Optional[BatchStream] = BatchStream(s.x_train, None, cfg.batch_size, cfg.seed + 1)
        else:
            self.labeled = BatchStream(s.x_train, s.y_train, cfg.batch_size, cfg.seed)
            self.unlabeled = None
        self.iters_per_epoch = (self.unlabeled or self.labeled).batches_per_epoch
        self.total_iters = cfg.epochs * self.iters_per_epoch
        if cfg.max_iters >= 0:
            self.total_iters = min(self.total_iters, cfg.max_iters)
        self.pad = data.pad if cfg.augment else 0
        self.flip = data.flip and cfg.augment

        # --- model, sampler, optimiser ---
        self.jem = build_jem(cfg, data.shape[0], data.num_classes).to(dev)
        self.uses_samples = cfg.uses_samples
        self.weights = Weights.from_config(cfg)
        self.sampler = build_sampler(cfg, data.shape, data.num_classes, dev, (data.x_train, data.y_train))
        self.opt = build_optimizer(cfg, self.jem.parameters())
        self.schedule = lr_factor(cfg, self.iters_per_epoch, self.total_iters)
        self.lr_scale = 1.0  # halved at every rollback
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.step = 0
        self.best_val = -1.0
        self.train_seconds = 0.0
        self.rollbacks = 0
        self.snapshot: Optional[dict] = None
        self.events: list[dict] = []  # rollbacks, written to metrics.jsonl

    @property
    def buffer(self) -> ReplayBuffer:
        return self.sampler.buffer

    def lr_factor(self, step: int) -> float:
        return self.lr_scale * self.schedule(step)

    # ---------------------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One iteration of Algorithm 1. Returns the step's statistics as Python floats (one host sync)."""
        cfg = self.cfg
        self.jem.train()
        x_u8, y = self.labeled.batch(self.step)
        x = augment(to_float(x_u8), self.pad, self.flip, cfg.data_noise)
        x_px = samples = samples_y = None
        if self.uses_samples:
            if self.unlabeled is not None:
                x_px = augment(to_float(self.unlabeled.batch(self.step)[0]), self.pad, self.flip, cfg.data_noise)
            if cfg.p_x_weight > 0:
                samples = self.sampler.sample(self.jem, len(x))  # x̂ ~ p(x)
            if cfg.p_x_y_weight > 0:
                samples_y = self.sampler.sample(self.jem, len(x), y=y)  # x̂_y ~ p(x|y)
        loss, stats = jem_loss(self.jem, x, y, weights=self.weights, x_px=x_px, samples=samples, samples_y=samples_y)

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.jem.parameters(), max_norm)
        names = list(stats)
        values = dict(zip(names, torch.stack([stats[k].detach().float() for k in names]).tolist()))

        healthy = all(math.isfinite(v) for v in values.values()) and abs(values.get("energy_gap", 0.0)) <= cfg.max_energy_gap
        if not healthy:
            self.roll_back(values)
            values["rollback"] = 1.0
            return values
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.step % cfg.snapshot_every == 0:
            self.take_snapshot()
        return values

    def take_snapshot(self) -> None:
        self.snapshot = {"model": {k: v.detach().clone() for k, v in self.jem.f.state_dict().items()},
                         "optimizer": copy.deepcopy(self.opt.state_dict()), "buffer": self.buffer.data.clone(),
                         "step": self.step}

    def roll_back(self, values: dict) -> None:
        """Divergence: restore model, optimiser and replay buffer from the last snapshot and halve the lr — or give up.

        (Restarting the buffer from noise instead would itself look like divergence: a trained model gives noise a
        far higher energy than data, so the next gap would be huge.)"""
        self.opt.zero_grad(set_to_none=True)
        if self.rollbacks >= self.cfg.max_rollbacks or self.snapshot is None:
            raise TrainingDiverged(
                f"training diverged at iteration {self.step} after {self.rollbacks} rollbacks: non-finite loss or "
                f"|energy gap| > {self.cfg.max_energy_gap:g} (gap {values.get('energy_gap', float('nan')):.4g}, "
                f"loss {values['loss']:.4g}). Last checkpoint: {self.run.checkpoint}; try a lower --lr, more "
                f"--warmup-iters or a smaller --sgld-lr.")
        self.rollbacks += 1
        self.lr_scale *= 0.5
        self.jem.f.load_state_dict(self.snapshot["model"])
        self.opt.load_state_dict(self.snapshot["optimizer"])
        self.step = self.snapshot["step"]
        self.sched.last_epoch = self.step - 1
        self.sched.step()  # recompute the lr for the restored step with the new scale
        self.buffer.data = self.snapshot["buffer"].clone()
        self.events.append({"kind": "rollback", "step": self.step, "lr_scale": self.lr_scale,
                            "energy_gap": values.get("energy_gap"), "loss": values["loss"]})

    # ---------------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until ``total_iters``; write metrics, samples, checkpoints; return the summary."""
        cfg = self.cfg
        self.run.write_config(cfg)
        log = MetricsLog(self.run / METRICS)
        sample_every = cfg.sample_every if cfg.sample_every > 0 else 10 * self.iters_per_epoch
        window: dict[str, list[float]] = {}
        bar = tqdm(total=self.total_iters, initial=self.step, disable=not cfg.progress, dynamic_ncols=True,
                   desc=f"jem {cfg.run_name}", unit="it")
        t_last = time.perf_counter()
        self.take_snapshot()
        try:
            while self.step < self.total_iters:
                values = self.train_step()
                if values.get("rollback"):
                    for ev in self.events:
                        log.write(ev)
                        bar.write(f"divergence: rolled back to iteration {ev['step']}, lr ×{ev['lr_scale']:g}")
                    self.events.clear()
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
                last = self.step == self.total_iters
                now = time.perf_counter()
                self.train_seconds += now - t_last
                t_last = now

                if self.step % cfg.log_every == 0:
                    rec = {"kind": "train", "step": self.step, "epoch": self.step / self.iters_per_epoch,
                           "lr": self.opt.param_groups[0]["lr"], "time": round(self.train_seconds, 3)}
                    rec.update({k: sum(v) / len(v) for k, v in window.items()})
                    log.write(rec)
                    window.clear()
                if epoch_done and ((self.step // self.iters_per_epoch) % cfg.eval_every == 0 or last):
                    self.validate(log)
                if self.uses_samples and (self.step % sample_every == 0 or last):
                    self.write_samples()
                if (epoch_done and (self.step // self.iters_per_epoch) % cfg.ckpt_every == 0) or last:
                    self.save()
                t_last = time.perf_counter()  # bookkeeping above is not training time
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            bar.close()
            log.close()
        return self.finish()

    def validate(self, log: MetricsLog) -> None:
        """Validation accuracy/NLL into the log; a new best is saved as ``best.pt``."""
        s = self.splits
        if len(s.x_val) == 0:
            return
        ev = accuracy_and_nll(self.jem, s.x_val, s.y_val)
        log.write({"kind": "eval", "step": self.step, "epoch": self.step / self.iters_per_epoch,
                   "val_accuracy": ev["accuracy"], "val_nll": ev["nll"]})
        if ev["accuracy"] > self.best_val:
            self.best_val = ev["accuracy"]
            self.run.save_best({"model": self.jem.f.state_dict(), "step": self.step, "val_accuracy": ev["accuracy"],
                                "config": self.cfg.to_dict()})

    def finish(self) -> dict:
        """Test the best-validation model (or the final one without a validation split); write summary.json."""
        s = self.splits
        last = accuracy_and_nll(self.jem, s.x_test, s.y_test)
        best = last
        if len(s.x_val) > 0 and self.run.best.exists():
            final_state = {k: v.clone() for k, v in self.jem.f.state_dict().items()}
            self.jem.f.load_state_dict(load_safe(self.run.best, self.device)["model"])
            best = accuracy_and_nll(self.jem, s.x_test, s.y_test)
            self.jem.f.load_state_dict(final_state)
        summary = {
            "test_accuracy": best["accuracy"],
            "test_nll": best["nll"],
            "test_accuracy_last": last["accuracy"],
            "best_val_accuracy": self.best_val if self.best_val >= 0 else None,
            "train_seconds": round(self.train_seconds, 2),
            "iterations": self.step,
            "epochs": self.step / self.iters_per_epoch,
            "rollbacks": self.rollbacks,
            "dataset": self.cfg.dataset,
            "model": self.cfg.model,
            "num_params": sum(p.numel() for p in self.jem.parameters()),
            "p_x_weight": self.cfg.p_x_weight,
            "device": str(self.device),
            "torch": torch.__version__,
            "host": platform.node(),
        }
        self.run.write_summary(summary)
        return summary

    def write_samples(self) -> None:
        """Replay-buffer grids for this step (see figures.buffer_grids)."""
        buffer_grids(self.buffer.data, self.jem, self.data.num_classes, self.buffer.class_conditional, self.step,
                     self.run / SAMPLES_DIR, tuple(self.run / n for n in LATEST_SAMPLES))

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
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "config": self.cfg.to_dict(),
            "dataset": {"name": self.data.name, "shape": list(self.data.shape), "classes": self.data.classes},
        }

    def save(self) -> None:
        self.run.save_checkpoint(self.state_dict())

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
            self.rollbacks = int(state["rollbacks"])
            self.lr_scale = float(state["lr_scale"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not match this run's model/config: {str(e).splitlines()[0]}") from None

    def resume(self) -> None:
        """Load ``RUN_DIR/checkpoint.pt`` and drop metrics logged after it, so the log reads like one run."""
        self.load_state_dict(load_safe(self.run.checkpoint, self.device))
        MetricsLog(self.run / METRICS).truncate_after(self.step)


def _postfix(values: dict) -> dict:
    short = {"loss": "loss", "l_clf": "clf", "l_pxy": "pxy", "train_acc": "acc", "energy_gap": "gap"}
    return {s: f"{values[k]:.3f}" for k, s in short.items() if k in values}


def train(cfg: TrainConfig, resume: bool = False, data: Optional[ImageData] = None) -> dict:
    """Train a JEM as configured; with ``resume=True`` continue from ``cfg.run_dir``'s checkpoint."""
    trainer = Trainer(cfg, data)
    if resume:
        trainer.resume()
    return trainer.fit()
