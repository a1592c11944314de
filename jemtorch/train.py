"""JEM training (Algorithm 1 of Grathwohl et al. 2020): one readable loop.

One iteration, following one batch:
    x, y      ← labelled batch from the device-resident dataset, augmented on the device (+ σ_data noise)
    x_px      ← x itself, or (semi-supervised) a batch of the full, mostly unlabelled training set
    x̂         ← replay buffer → η SGLD steps on log p(x) (parameters frozen) → written back
    logits    ← f([x, x_px, x̂, x̂_y]) in ONE forward pass
    L         = w_clf·CE(f(x), y) + w_px·(LSE f(x̂) − LSE f(x_px)) + w_pxy·(f(x̂_y)[y] − f(x)[y])
                [+ λ·(E(x_px)² + E(x̂)²) with --energy-reg λ > 0]
    Adam step; warm-up and step decay of the learning rate.

The p(x) term equals the energy gap E(data) − E(samples): near 0 is healthy, large |gap| means the sampler has
lost track of the model. A step whose loss is non-finite or whose |gap| exceeds ``max_energy_gap`` is a
divergence: the step is not applied, model, optimiser and replay buffer roll back to the last in-memory snapshot
(taken every ``snapshot_every`` healthy steps) and the learning rate is halved. After
``max_rollbacks`` of these the run stops with TrainingDiverged (the official code stops with ``1/0`` at once).
"""
from __future__ import annotations

import copy
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_safe, rng_state, save_atomic, set_rng_state
from .config import TrainConfig
from .data import BatchStream, ImageData, augment, labeled_subset, load_dataset, stratified_split, to_float
from .energy import JEM
from .models import create_model
from .sampler import JEMSampler, ReplayBuffer
from .viz import save_grid

CHECKPOINT = "checkpoint.pt"  # everything needed to resume
BEST = "best.pt"  # model weights with the best validation accuracy


class TrainingDiverged(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


def build_jem(cfg: TrainConfig, in_channels: int, num_classes: int) -> JEM:
    return JEM(create_model(cfg.model, in_channels=in_channels, num_classes=num_classes, norm=cfg.norm,
                            dropout=cfg.dropout))


@torch.no_grad()
def evaluate(jem: JEM, x_u8: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict:
    """Accuracy and NLL of p(y|x) on uint8 images (no augmentation, no noise)."""
    was_training = jem.training
    jem.eval()
    correct, nll = 0, 0.0
    for i in range(0, len(x_u8), batch_size):
        logits = jem(to_float(x_u8[i : i + batch_size]))
        yb = y[i : i + batch_size]
        correct += (logits.argmax(1) == yb).sum().item()
        nll += F.cross_entropy(logits, yb, reduction="sum").item()
    jem.train(was_training)
    n = max(len(x_u8), 1)
    return {"accuracy": correct / n, "nll": nll / n}


class Trainer:
    """Holds the model, sampler, optimiser and data streams of one run; ``fit()`` runs the loop."""

    def __init__(self, cfg: TrainConfig, data: Optional[ImageData] = None):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.run_dir = cfg.run_dir
        torch.manual_seed(cfg.seed)

        # --- data: whole dataset as uint8 tensors on the device ---
        data = data if data is not None else load_dataset(cfg.dataset, cfg.data_root, cfg.download)
        self.data = data
        n_valid = cfg.n_valid if cfg.n_valid >= 0 else len(data.y_train) // 10
        train_idx, val_idx = stratified_split(data.y_train, n_valid, cfg.seed)
        dev = self.device
        self.x_train, self.y_train = data.x_train[train_idx].to(dev), data.y_train[train_idx].to(dev)
        self.x_val, self.y_val = data.x_train[val_idx].to(dev), data.y_train[val_idx].to(dev)
        self.x_test, self.y_test = data.x_test.to(dev), data.y_test.to(dev)
        self.semi_supervised = cfg.labels_per_class > 0
        if self.semi_supervised:
            lab = labeled_subset(data.y_train[train_idx], cfg.labels_per_class, cfg.seed).to(dev)
            self.labeled = BatchStream(self.x_train[lab], self.y_train[lab], cfg.batch_size, cfg.seed)
            self.unlabeled = BatchStream(self.x_train, None, cfg.batch_size, cfg.seed + 1)
            self.iters_per_epoch = self.unlabeled.batches_per_epoch
        else:
            self.labeled = BatchStream(self.x_train, self.y_train, cfg.batch_size, cfg.seed)
            self.unlabeled = None
            self.iters_per_epoch = self.labeled.batches_per_epoch
        self.total_iters = cfg.epochs * self.iters_per_epoch
        if cfg.max_iters >= 0:
            self.total_iters = min(self.total_iters, cfg.max_iters)
        self.pad = data.pad if cfg.augment else 0
        self.flip = data.flip and cfg.augment

        # --- model, sampler, optimiser ---
        self.jem = build_jem(cfg, data.shape[0], data.num_classes).to(dev)
        self.uses_samples = cfg.p_x_weight > 0 or cfg.p_x_y_weight > 0
        self.buffer = ReplayBuffer(cfg.buffer_size, data.shape, data.num_classes, cfg.reinit_freq,
                                   cfg.class_conditional, dev)
        self.sampler = JEMSampler(self.buffer, cfg.sgld_lr, cfg.sgld_std, cfg.sgld_steps, cfg.sgld_clamp)
        params = self.jem.parameters()
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.step = 0
        self.best_val = -1.0
        self.train_seconds = 0.0
        self.lr_scale = 1.0  # halved at every rollback
        self.rollbacks = 0
        self.snapshot: Optional[dict] = None
        self.events: list[dict] = []  # rollbacks, written to metrics.jsonl
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)

    # ---------------------------------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_iters``, then ×decay_rate at each of ``decay_epochs``."""
        warm = min(1.0, (step + 1) / self.cfg.warmup_iters) if self.cfg.warmup_iters > 0 else 1.0
        epoch = step // self.iters_per_epoch
        return self.lr_scale * warm * self.cfg.decay_rate ** sum(epoch >= e for e in self.cfg.decay_epochs)

    def prepare(self, x_u8: torch.Tensor) -> torch.Tensor:
        return augment(to_float(x_u8), self.pad, self.flip, self.cfg.data_noise)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, x_px: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The JEM objective for one batch; all network evaluations of the loss happen in one forward pass.

        ``x_px`` is the batch for the p(x) term when it differs from the labelled batch (semi-supervised), else None.
        """
        cfg, b = self.cfg, len(x)
        parts = [x] + ([x_px] if x_px is not None else [])
        if cfg.p_x_weight > 0:
            parts.append(self.sampler.sample(self.jem, b))  # x̂ ~ p(x)
        if cfg.p_x_y_weight > 0:
            parts.append(self.sampler.sample(self.jem, b, y=y))  # x̂_y ~ p(x|y)
        logits = self.jem(torch.cat(parts)).split([len(p) for p in parts])
        logits_x, rest = logits[0], list(logits[1:])
        logits_px = rest.pop(0) if x_px is not None else logits_x

        l_clf = F.cross_entropy(logits_x, y)
        loss = cfg.p_y_given_x_weight * l_clf
        stats = {"l_clf": l_clf, "train_acc": (logits_x.argmax(1) == y).float().mean()}
        if cfg.p_x_weight > 0:
            e_data, e_samples = -self.jem.log_px(logits=logits_px), -self.jem.log_px(logits=rest.pop(0))
            l_px = e_data.mean() - e_samples.mean()  # = −(LSE f(x) − LSE f(x̂)) = energy gap
            loss = loss + cfg.p_x_weight * l_px
            if cfg.energy_reg > 0:
                loss = loss + cfg.energy_reg * (e_data.pow(2).mean() + e_samples.pow(2).mean())
            stats.update(l_px=l_px, energy_gap=l_px, e_data=e_data.mean(), e_samples=e_samples.mean())
        if cfg.p_x_y_weight > 0:
            l_pxy = -self.jem.log_pxy(None, y, logits=logits_x).mean() + self.jem.log_pxy(None, y, logits=rest.pop(0)).mean()
            loss = loss + cfg.p_x_y_weight * l_pxy
            stats.update(l_pxy=l_pxy)
            stats.setdefault("energy_gap", l_pxy)
        stats["loss"] = loss
        return loss, stats

    def train_step(self) -> dict:
        """One iteration of Algorithm 1. Returns the step's statistics as Python floats (one host sync)."""
        self.jem.train()
        x_u8, y = self.labeled.batch(self.step)
        x = self.prepare(x_u8)
        x_px = self.prepare(self.unlabeled.batch(self.step)[0]) if self.unlabeled is not None and self.uses_samples else None
        loss, stats = self.compute_loss(x, y, x_px)

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.jem.parameters(), max_norm)
        names = list(stats)
        values = dict(zip(names, torch.stack([stats[k].detach().float() for k in names]).tolist()))

        healthy = all(math.isfinite(v) for v in values.values()) and abs(values.get("energy_gap", 0.0)) <= self.cfg.max_energy_gap
        if not healthy:
            self.roll_back(values)
            values["rollback"] = 1.0
            return values
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.step % self.cfg.snapshot_every == 0:
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
                f"loss {values['loss']:.4g}). Last checkpoint: {self.run_dir / CHECKPOINT}; try a lower --lr, more "
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
        from tqdm.auto import tqdm

        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        metrics = open(run_dir / "metrics.jsonl", "a")
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
                        metrics.write(json.dumps(ev) + "\n")
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
                    rec.update({k: _mean(v) for k, v in window.items()})
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    window.clear()
                if epoch_done and ((self.step // self.iters_per_epoch) % cfg.eval_every == 0 or last):
                    self._validate(metrics)
                if self.uses_samples and (self.step % sample_every == 0 or last):
                    self.write_samples()
                if (epoch_done and (self.step // self.iters_per_epoch) % cfg.ckpt_every == 0) or last:
                    self.save()
                t_last = time.perf_counter()  # bookkeeping above is not training time
        except KeyboardInterrupt:
            self.save()
            bar.close()
            metrics.close()
            raise
        bar.close()
        metrics.close()
        return self.finish()

    def _validate(self, metrics) -> None:
        if len(self.x_val) == 0:
            return
        ev = evaluate(self.jem, self.x_val, self.y_val)
        rec = {"kind": "eval", "step": self.step, "epoch": self.step / self.iters_per_epoch,
               "val_accuracy": ev["accuracy"], "val_nll": ev["nll"]}
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        if ev["accuracy"] > self.best_val:
            self.best_val = ev["accuracy"]
            save_atomic({"model": self.jem.f.state_dict(), "step": self.step, "val_accuracy": ev["accuracy"],
                         "config": self.cfg.to_dict()}, self.run_dir / BEST)

    def finish(self) -> dict:
        """Test the best-validation model (or the final one without a validation split); write summary.json."""
        last = evaluate(self.jem, self.x_test, self.y_test)
        best = last
        best_path = self.run_dir / BEST
        if len(self.x_val) > 0 and best_path.exists():
            final_state = {k: v.clone() for k, v in self.jem.f.state_dict().items()}
            self.jem.f.load_state_dict(load_safe(best_path, self.device)["model"])
            best = evaluate(self.jem, self.x_test, self.y_test)
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
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    @torch.no_grad()
    def write_samples(self, n_per_class: int = 10) -> None:
        """Grids from the replay buffer: unconditional (100 random chains) and one row per class.

        Rows: the buffer's class slices for a class-conditional buffer, else buffer samples grouped by the class the
        model predicts (most confident first). Uses a forked RNG so it never changes the training trajectory.
        """
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            g = torch.Generator().manual_seed(self.step)
            buf = self.buffer.data
            pick = torch.randperm(len(buf), generator=g)[:100].to(buf.device)
            out = self.run_dir / "samples"
            uncond = save_grid(buf[pick], out / f"uncond_{self.step:07d}.png", nrow=10)
            cond = save_grid(self.samples_by_class(n_per_class, g), out / f"cond_{self.step:07d}.png", nrow=n_per_class)
        shutil.copyfile(uncond, self.run_dir / "samples_uncond.png")  # the latest grids, at a fixed name
        shutil.copyfile(cond, self.run_dir / "samples_cond.png")

    @torch.no_grad()
    def samples_by_class(self, n_per_class: int, g: torch.Generator) -> torch.Tensor:
        buf, c = self.buffer.data, self.data.num_classes
        if self.buffer.class_conditional:
            per = len(buf) // c
            return torch.cat([buf[k * per : k * per + min(n_per_class, per)] for k in range(c)])
        pool = buf[torch.randperm(len(buf), generator=g)[: min(len(buf), 2000)].to(buf.device)]
        was = self.jem.training
        self.jem.eval()
        probs = torch.cat([self.jem(pool[i : i + 500]).softmax(1) for i in range(0, len(pool), 500)])
        self.jem.train(was)
        conf, pred = probs.max(1)
        rows = []
        for k in range(c):
            idx = torch.nonzero(pred == k).flatten()
            idx = idx[conf[idx].argsort(descending=True)][:n_per_class]
            row = pool[idx]
            if len(row) < n_per_class:  # pad a short row with blank (white) tiles
                row = torch.cat([row, torch.ones(n_per_class - len(row), *pool.shape[1:], device=pool.device)])
            rows.append(row)
        return torch.cat(rows)

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

    def save(self) -> Path:
        return save_atomic(self.state_dict(), self.run_dir / CHECKPOINT)

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
        self.load_state_dict(load_safe(self.run_dir / CHECKPOINT, self.device))
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _postfix(values: dict) -> dict:
    short = {"loss": "loss", "l_clf": "clf", "l_pxy": "pxy", "train_acc": "acc", "energy_gap": "gap"}
    return {s: f"{values[k]:.3f}" for k, s in short.items() if k in values}


def train(cfg: TrainConfig, resume: bool = False, data: Optional[ImageData] = None) -> dict:
    """Train a JEM as configured; with ``resume=True`` continue from ``cfg.run_dir``'s checkpoint."""
    trainer = Trainer(cfg, data)
    if resume:
        trainer.resume()
    return trainer.fit()
