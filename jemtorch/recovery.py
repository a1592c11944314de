"""Divergence recovery: a guard over the training state, with snapshots and a ladder of escalating actions.

Every ``snapshot_every`` healthy iterations, model, optimiser and replay buffer are copied in memory (the last
``snapshots_kept``). A divergence (a non-finite loss or statistic, or |E(data) − E(samples)| > ``max_energy_gap``)
drops the step and goes back to the newest snapshot; a snapshot is used once, so a divergence soon after a rollback
(within 2·snapshot_every healthy iterations) goes further back and climbs one rung, while a divergence after a
healthy stretch starts again at rung 1:

  1. restore, re-seed the random number generators, lr ×0.5 (the lr doubles back after each healthy stretch of
     snapshot_every iterations, but not to a scale that diverged again within 2·snapshot_every iterations of its
     return: that scale stays the ceiling for the rest of the run)
  2. + restart 10% of the replay buffer from the initial distribution
  3. + raise the energy penalty λ·(E(data)² + E(samples)²) to max(0.1, 2λ) (JEM issues #4/#8: "energy L2 ≈ 0.1")
  4. + halve the sampler's step size

Past rung 4, with no snapshot left, or after ``max_rollbacks`` recoveries, the run stops with TrainingDiverged.
Each action is returned as a ``recovery``/``rollback`` record (metrics.jsonl) with a one-line message (the screen).
The official code stops with ``1/0`` at the first divergence.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from .objective import Weights


class TrainingDiverged(RuntimeError):
    pass


class Recovery:
    """The ladder's state (``state_dict``) and its actions on a ``train.TrainState`` handed in at every call."""

    RUNGS = 4
    REFRESH = 0.1

    def __init__(self, cfg, checkpoint: Path, rank_seed: int = 0, base_step: Optional[float] = None):
        self.cfg, self.checkpoint, self.rank_seed = cfg, checkpoint, rank_seed
        self.base_step = base_step  # the sampler's step size as configured (rung 4 scales it)
        self.snapshots: list[dict] = []
        self.count = 0  # recoveries so far
        self.level = 0  # rung of the last recovery
        self.healthy = 0  # healthy iterations since the last recovery
        self.lr_scale = 1.0
        self.lr_ceiling = 1.0  # lowered when the lr diverges soon after it was raised back
        self.since_raise: Optional[int] = None  # healthy iterations since the lr was last raised back
        self.energy_reg = cfg.energy_reg
        self.raised_energy_reg: Optional[float] = None  # set by rung 3; a resumed run keeps it over its config
        self.sampler_scale = 1.0

    @property
    def weights(self) -> Weights:
        """The loss weights of the config, with the energy penalty as the ladder has it."""
        return replace(Weights.from_config(self.cfg), energy_reg=self.energy_reg)

    def take_snapshot(self, state) -> None:
        self.snapshots.append({"model": {k: v.detach().clone() for k, v in state.jem.f.state_dict().items()},
                               "optimizer": copy.deepcopy(state.opt.state_dict()), "buffer": state.buffer.data.clone(),
                               "step": state.step})
        self.snapshots = self.snapshots[-self.cfg.snapshots_kept:]

    def healthy_step(self, state) -> list[dict]:
        """After every applied step: snapshots, and the lr creeping back after a healthy stretch."""
        cfg, events = self.cfg, []
        self.healthy += 1
        if self.since_raise is not None:
            self.since_raise += 1
        if state.step % cfg.snapshot_every == 0:
            self.take_snapshot(state)
        if self.lr_scale < self.lr_ceiling and self.healthy % cfg.snapshot_every == 0:
            self.lr_scale, self.since_raise = min(self.lr_ceiling, 2 * self.lr_scale), 0
            events.append({"kind": "recovery", "step": state.step, "action": "lr", "lr_scale": self.lr_scale,
                           "message": f"recovery: {cfg.snapshot_every} healthy iterations, lr back to ×{self.lr_scale:g}"})
        return events

    def give_up(self, state, values: dict, level: int) -> None:
        """Raise TrainingDiverged when the ladder has no rung, snapshot or recovery left."""
        cfg = self.cfg
        if self.count < cfg.max_rollbacks and level <= self.RUNGS and self.snapshots:
            return
        why = ("no earlier snapshot is left" if not self.snapshots else
               f"{self.count} recoveries (--max-rollbacks {cfg.max_rollbacks})" if self.count >= cfg.max_rollbacks
               else f"{self.RUNGS} recoveries in quick succession")
        where = self.checkpoint if self.checkpoint.exists() else "none written yet"
        raise TrainingDiverged(
            f"training diverged at iteration {state.step} and cannot recover ({why}): non-finite loss or |energy gap| > "
            f"{cfg.max_energy_gap:g} (gap {values.get('energy_gap', float('nan')):.4g}, loss {values['loss']:.4g}). "
            f"Last checkpoint: {where}; try --energy-reg 0.1, a lower --lr, more --warmup-iters or a smaller --sgld-lr.")

    def recover(self, state, values: dict) -> list[dict]:
        """Roll ``state`` back to the newest unused snapshot and climb the ladder; returns the rollback record."""
        soon = self.count > 0 and self.healthy < 2 * self.cfg.snapshot_every
        level = self.level + 1 if soon else 1
        self.give_up(state, values, level)
        failed_at, snap = state.step, self.snapshots.pop()  # used once: a state that led to divergence never returns
        state.jem.f.load_state_dict(snap["model"])
        state.opt.load_state_dict(snap["optimizer"])
        state.buffer.data = snap["buffer"].clone()
        state.step = snap["step"]
        self.count, self.level, self.healthy = self.count + 1, level, 0
        torch.manual_seed(self.cfg.seed + 1_000_003 * self.count + self.rank_seed)  # a new trajectory from there
        actions = [f"rolled back to iteration {state.step}", "re-seeded"]
        if self.since_raise is not None and self.since_raise < 2 * self.cfg.snapshot_every:
            self.lr_ceiling = self.lr_scale / 2  # raising the lr brought the divergence back: it stays below
            actions.append(f"lr ×{self.lr_ceiling:g} at most from now on (it diverged {self.since_raise} iterations "
                           f"after it was raised back)")
        else:
            actions.append(f"lr ×{self.lr_scale / 2:g}")
        self.lr_scale, self.since_raise = self.lr_scale / 2, None
        if level >= 2:
            actions.append(f"restarted {state.buffer.refresh(self.REFRESH)} buffer chains from the initial distribution")
        if level >= 3:
            self.energy_reg = self.raised_energy_reg = max(0.1, 2 * self.energy_reg)
            actions.append(f"energy penalty {self.energy_reg:g}")
        if level >= 4 and self.base_step is not None:
            self.sampler_scale *= 0.5
            self.apply_sampler_scale(state.sampler)
            actions.append(f"sampler step ×{self.sampler_scale:g}")
        state.sched.last_epoch = state.step - 1
        state.sched.step()  # the lr of the restored step with the new scale
        gap = values.get("energy_gap", float("nan"))
        return [{"kind": "rollback", "step": state.step, "diverged_at": failed_at, "rung": level, "energy_gap": gap,
                 "loss": values["loss"], "lr_scale": self.lr_scale, "lr_ceiling": self.lr_ceiling, "energy_reg": self.energy_reg,
                 "sampler_scale": self.sampler_scale,
                 "message": f"divergence at iteration {failed_at} (gap {gap:.4g}); rung {level}: " + ", ".join(actions)}]

    def apply_sampler_scale(self, sampler) -> None:
        if self.base_step is not None:
            sampler.update.step_size = self.base_step * self.sampler_scale

    def state_dict(self) -> dict:
        return {"count": self.count, "level": self.level, "healthy": self.healthy, "lr_scale": self.lr_scale,
                "lr_ceiling": self.lr_ceiling, "since_raise": self.since_raise,
                "raised_energy_reg": self.raised_energy_reg, "sampler_scale": self.sampler_scale}

    def load_state_dict(self, state: dict, sampler) -> None:
        """Restore the ladder; the config's own energy penalty (which a resume may change) is kept unless the ladder
        had raised it above that."""
        self.count, self.level, self.healthy = int(state["count"]), int(state["level"]), int(state["healthy"])
        self.lr_scale, self.sampler_scale = float(state["lr_scale"]), float(state["sampler_scale"])
        self.lr_ceiling = float(state.get("lr_ceiling", 1.0))  # older checkpoints have none: no ceiling
        since = state.get("since_raise")
        self.since_raise = None if since is None else int(since)
        raised = state.get("raised_energy_reg")
        self.raised_energy_reg = None if raised is None else float(raised)
        self.energy_reg = max(self.cfg.energy_reg, self.raised_energy_reg or 0.0)
        self.apply_sampler_scale(sampler)
