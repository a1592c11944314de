"""Callbacks of the training loop: each owns one concern, its state and that state's ``state_dict`` (the pattern of
Lightning's ``Timer`` and ``ModelCheckpoint``). The loop in ``train.py`` only calls them:

    Timer           training seconds; ``--time-limit`` ends the run after the last epoch that fits
    MetricsWindow   averages the step values into one ``train`` record every ``--log-every`` iterations
    WeightAverage   ``--ema-decay``: a moving average of the weights, which validation and best.pt use
    Validation      validation accuracy after epochs; the best model → best.pt
    Curves          curves.png after epochs (at most every 30 s) and at the end
    SampleGrids     replay-buffer grids every ``--sample-every`` iterations and at the end
    Checkpoint      checkpoint.pt after every ``--ckpt-every`` epochs and at the end (copies kept after
                    ``--keep-epochs``); resume
    Interrupt       Ctrl-C: finish the iteration, save a checkpoint, stop
    FaultInjection  ``--inject-divergence``: report a divergence at given iterations (tests the recovery ladder)

Hooks, all optional, each given the Trainer ``t``: ``on_fit_start(t)``; ``on_iteration_start(t)``; ``on_stats(t,
stats)`` (a step's statistics before the divergence check); ``on_rollback(t)``; ``on_step_end(t, values)`` (after an
applied step, in list order: the Timer first, the Checkpoint last); ``on_fit_end(t)`` (also after an exception).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_safe, rng_state
from .data import to_float
from .distributed import Dist
from .energy import JEM, eval_mode, in_batches
from .figures import buffer_grids, training_curves
from .models.wrn import model_as_written
from .rundir import CURVES, LATEST_SAMPLES, METRICS, SAMPLES_DIR, MetricsLog
from .version import __version__


class Callback:
    """Base class: every hook does nothing; ``state_dict`` is empty (nothing to checkpoint)."""

    def on_fit_start(self, t) -> None: ...

    def on_iteration_start(self, t) -> None: ...

    def on_stats(self, t, stats: dict) -> None: ...

    def on_rollback(self, t) -> None: ...

    def on_step_end(self, t, values: dict) -> None: ...

    def on_fit_end(self, t) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


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


# ----------------------------------------------------------------------------------------------------------------
class Timer(Callback):
    """Training seconds (bookkeeping excluded) and ``--time-limit``: stop at an epoch's end when one more epoch, as
    long as the longer of the mean and the last epoch, would not fit; within an epoch, once the budget is spent.
    Under torch.distributed the ranks agree (any rank's 'yes'). The lr schedule stays the one for ``--epochs``."""

    def __init__(self, limit: float = 0.0):
        self.limit = limit
        self.seconds = 0.0
        self.epoch_started_at: Optional[float] = 0.0  # training seconds at the start of this epoch (None: unknown)

    def add(self, seconds: float) -> None:
        self.seconds += seconds

    def out_of_time(self, t, epoch_done: bool) -> bool:
        up = self.seconds >= self.limit
        if epoch_done:  # the next epoch is predicted to last as long as the longest of: the mean one, the last one
            mean = self.seconds / (t.state.step / t.clock.iters_per_epoch)
            last = self.seconds - self.epoch_started_at if self.epoch_started_at is not None else 0.0
            up = up or self.seconds + max(mean, last) > self.limit
            self.epoch_started_at = self.seconds
        if t.dist.enabled:
            up = t.dist.all_reduce_sum(torch.tensor([float(up)], device=t.device)).item() > 0
        return up

    def on_step_end(self, t, values: dict) -> None:
        if self.limit <= 0 or t.state.step >= t.clock.total_iters or not self.out_of_time(t, t.epoch_done):
            return
        t.clock.total_iters = t.state.step  # this iteration is the last
        epoch = t.state.step / t.clock.iters_per_epoch
        t.emit({"kind": "time_limit", "step": t.state.step, "epoch": epoch, "time": round(self.seconds, 3),
                "message": f"time limit: stopping at iteration {t.state.step} (epoch {epoch:.2f}) after "
                           f"{self.seconds:.0f} s of training (--time-limit {self.limit:g})"})

    def state_dict(self) -> dict:
        return {"train_seconds": self.seconds, "epoch_started_at": self.epoch_started_at}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = float(state["train_seconds"])
        started = state.get("epoch_started_at")
        self.epoch_started_at = None if started is None else float(started)


class MetricsWindow(Callback):
    """The step values since the last ``train`` record, averaged into the next one every ``every`` iterations (the
    window is checkpointed: a resumed run logs what an uninterrupted one logs)."""

    def __init__(self, every: int):
        self.every = every
        self.window: dict[str, list[float]] = {}

    def on_rollback(self, t) -> None:
        self.window.clear()

    def on_step_end(self, t, values: dict) -> None:
        for k, v in values.items():
            self.window.setdefault(k, []).append(v)
        if t.state.step % self.every == 0:
            rec = {"kind": "train", "step": t.state.step, "epoch": t.state.step / t.clock.iters_per_epoch,
                   "lr": t.state.opt.param_groups[0]["lr"], "time": round(t.timer.seconds, 3)}
            rec.update({k: sum(v) / len(v) for k, v in self.window.items()})
            t.log.write(rec)
            self.window.clear()

    def state_dict(self) -> dict:
        return {"window": {k: list(v) for k, v in self.window.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.window = {str(k): [float(v) for v in vs] for k, vs in state.get("window", {}).items()}


@contextlib.contextmanager
def weights_in(module: torch.nn.Module, weights: dict) -> Iterator[None]:
    """``weights`` (a state dict) in ``module`` for the block, its own weights back after it."""
    own = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(weights)
    try:
        yield
    finally:
        module.load_state_dict(own)


class WeightAverage(Callback):
    """``--ema-decay d``: an exponential moving average of the model's weights, θ̄ ← d·θ̄ + (1 − d)·θ after every
    applied step (Polyak averaging, as diffusion and energy-based models keep for sampling and evaluation: Gao et al.
    2021, "Learning energy-based models by diffusion recovery likelihood", ruiqigao/recovery_likelihood config.py,
    ``ma_decay`` 0.999 "for testing"), starting from the weights the run starts (or branches) from. ``Validation``
    evaluates the average and saves it as best.pt, so every evaluation of the run (jem eval, attack, score, export)
    reads the averaged model; the training chains and the loss keep running on the live weights, which checkpoint.pt
    holds beside the average (this callback's state). A rollback (recovery.py) restores the live weights and leaves
    the average as it is. Integer buffers are copied."""

    def __init__(self, decay: float):
        self.decay = decay
        self.average: Optional[dict] = None

    def on_fit_start(self, t) -> None:
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in t.state.jem.f.state_dict().items()}

    @torch.no_grad()
    def on_step_end(self, t, values: dict) -> None:
        for k, v in t.state.jem.f.state_dict().items():
            if v.is_floating_point():
                self.average[k].lerp_(v, 1.0 - self.decay)
            else:
                self.average[k].copy_(v)

    def swapped_in(self, t) -> contextlib.AbstractContextManager:
        """The average in the model for the block, the live weights back after it."""
        return weights_in(t.state.jem.f, self.average)

    def state_dict(self) -> dict:
        return {"average": self.average} if self.average is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.average = state["average"]


def evaluated_weights(t) -> contextlib.AbstractContextManager:
    """The weights a run is evaluated with in the block: the moving average under ``--ema-decay``, else the live ones."""
    average = next((cb for cb in t.callbacks if isinstance(cb, WeightAverage)), None)
    return average.swapped_in(t) if average is not None else contextlib.nullcontext()


class Validation(Callback):
    """Validation accuracy/NLL after every ``--eval-every`` epochs, at the end, and at a time-limited end; a new best
    is saved as best.pt. A JEM's best model is chosen among the epochs from ``--px-start-epoch`` on (never the
    classifier-only epochs before it; the classifier's tail after ``--px-stop-epoch`` counts)."""

    def __init__(self):
        self.best = -1.0

    def on_step_end(self, t, values: dict) -> None:
        # a mid-epoch end is validated only when the time limit chose it (a --max-iters stop is a pause that a
        # resume continues, and must log exactly what an uninterrupted run logs)
        if (t.epoch_done and (t.epoch % t.cfg.eval_every == 0 or t.last)) or (t.last and t.time_limited):
            self.validate(t)

    def validate(self, t) -> None:
        s = t.splits
        if len(s.x_val) == 0:
            return
        with evaluated_weights(t):  # --ema-decay: the average is validated and saved
            ev = accuracy_and_nll(t.state.jem, s.x_val, s.y_val, dist=t.dist)
            t.log.write({"kind": "eval", "step": t.state.step, "epoch": t.state.step / t.clock.iters_per_epoch,
                         "val_accuracy": ev["accuracy"], "val_nll": ev["nll"]})
            if ev["accuracy"] > self.best and (t.phases.started(t.state.step) or not t.cfg.uses_samples):
                self.best = ev["accuracy"]
                if t.dist.is_main:
                    t.run.save_best({"model": t.state.jem.f.state_dict(), "step": t.state.step,
                                     "val_accuracy": ev["accuracy"], "config": t.cfg.to_dict(),
                                     "jemtorch_version": __version__})

    def state_dict(self) -> dict:
        return {"best_val": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best_val"])


class Curves(Callback):
    """curves.png: after an epoch, but not more often than every ``EVERY_S`` seconds (the figure costs ~1.4 s to
    draw; digits' epochs last ~6 s), and always at the end."""

    EVERY_S = 30.0

    def __init__(self):
        self.drawn = -math.inf  # the first epoch's figure is drawn at once

    def on_step_end(self, t, values: dict) -> None:
        if t.dist.is_main and (t.last or (t.epoch_done and time.perf_counter() - self.drawn >= self.EVERY_S)):
            training_curves(t.log.records(), t.run / CURVES)
            self.drawn = time.perf_counter()


class SampleGrids(Callback):
    """Replay-buffer grids (figures.buffer_grids) every ``--sample-every`` iterations (default: every 10 epochs) and
    at the end, also into TensorBoard when it is on."""

    def on_step_end(self, t, values: dict) -> None:
        cfg = t.cfg
        every = cfg.sample_every if cfg.sample_every > 0 else 10 * t.clock.iters_per_epoch
        if not (cfg.uses_samples and t.dist.is_main and (t.state.step % every == 0 or t.last)):
            return
        latest = tuple(t.run / n for n in LATEST_SAMPLES)
        buffer = t.state.buffer
        buffer_grids(buffer.data, t.state.jem, t.data.num_classes, buffer.class_conditional, t.state.step,
                     t.run / SAMPLES_DIR, latest)
        if t.tb is not None:
            t.tb.image("samples/unconditional", latest[0], t.state.step)
            t.tb.image("samples/by_class", latest[1], t.state.step)


class FaultInjection(Callback):
    """``--inject-divergence``: at each given iteration (once) rank 0 reports an infinite energy gap."""

    def __init__(self, steps=()):
        self.steps = set(steps)
        self.injected: set[int] = set()

    def on_stats(self, t, stats: dict) -> None:
        step = t.state.step
        if step in self.steps and step not in self.injected:
            self.injected.add(step)
            if t.dist.is_main:
                stats["energy_gap"] = torch.tensor(float("inf"), device=t.device)
            elif "energy_gap" not in stats:
                stats["energy_gap"] = torch.zeros((), device=t.device)

    def state_dict(self) -> dict:
        return {"injected": sorted(self.injected)}

    def load_state_dict(self, state: dict) -> None:
        self.injected = set(int(i) for i in state.get("injected", []))


# ----------------------------------------------------------------------------------------------------------------
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


class Interrupt(Callback):
    """Ctrl-C between iterations: save a checkpoint of the whole state, then raise KeyboardInterrupt. Under
    torch.distributed every rank stops at the same iteration, or none does."""

    def on_fit_start(self, t) -> None:
        self.stack = contextlib.ExitStack()
        self.flag = self.stack.enter_context(deferred_interrupt(lambda: t.say(
            "interrupt: finishing this iteration, then saving a checkpoint (Ctrl-C again stops at once; the last "
            "checkpoint stays)")))

    def on_iteration_start(self, t) -> None:
        if t.dist.enabled:
            self.flag.asked = t.dist.all_reduce_sum(torch.tensor([float(self.flag.asked)], device=t.device)).item() > 0
        if self.flag.asked:  # between iterations the state is whole: save it, then stop
            t.save()
            raise KeyboardInterrupt

    def on_fit_end(self, t) -> None:
        self.stack.close()


# ----------------------------------------------------------------------------------------------------------------
class Checkpoint(Callback):
    """checkpoint.pt: after every ``--ckpt-every`` epochs and at the end, copied to checkpoint-epoch<E>.pt (best.pt
    to best-epoch<E>.pt) after the epochs of ``--keep-epochs``; ``save`` and ``resume``. Under
    torch.distributed saving is a collective (every rank calls it at the same step): the file holds every rank's
    buffer and RNG state (``ranks``) and, as ``buffer``, all buffers concatenated; rank 0 writes it."""

    def on_step_end(self, t, values: dict) -> None:
        keep = t.epoch_done and t.epoch in t.cfg.kept_epochs
        if (t.epoch_done and t.epoch % t.cfg.ckpt_every == 0) or t.last or keep:
            self.save(t)
        if keep and t.dist.is_main:
            t.run.keep(t.epoch)

    @staticmethod
    def save(t) -> None:
        state = t.full_state()
        if t.dist.enabled:
            parts = t.dist.all_gather_object({"buffer": {k: v.cpu() for k, v in state["buffer"].items()},
                                              "rng": state["rng"]})
            state["ranks"] = {"world_size": t.dist.world_size, "buffers": [p["buffer"] for p in parts],
                              "rng": [p["rng"] for p in parts]}
            state["buffer"] = {"data": torch.cat([p["buffer"]["data"] for p in parts])}
        if t.dist.is_main:
            t.run.save_checkpoint(state)
        t.dist.barrier()

    @staticmethod
    def resume(t, changed: Optional[dict] = None) -> None:
        """Load RUN/checkpoint.pt (rank 0 reads it and hands it to the others) and drop metrics logged after it, so
        the log reads like one run. ``changed``: config entries given new values for this resume ({name: [old,
        new]}, ``config.resume_changes``), logged as a ``kind: resume`` record; the optimiser's own hyper-parameters
        come back from the checkpoint, so they are set again from the config here."""
        d = t.dist
        state = load_safe(t.run.checkpoint, t.device) if not d.enabled else d.broadcast_object(
            load_safe(t.run.checkpoint, "cpu") if d.is_main else None)
        if not isinstance(state, dict):
            raise CheckpointError(f"{t.run.checkpoint} is not a jemtorch checkpoint (it holds a {type(state).__name__})")
        if model_as_written(t.cfg.model, state.get("jemtorch_version")) != t.cfg.model:
            raise CheckpointError(f"{t.run.checkpoint} was written by jemtorch 0.1, whose {t.cfg.model} put each "
                                  f"stage's stride on the first convolution (now wrn-firststride-...): it evaluates "
                                  f"as it was trained, but cannot resume as {t.cfg.model}; start a new run")
        note = rank_state(t, state)
        t.load_full_state(state)
        if note and d.is_main:
            print(f"jem train: {note}", file=sys.stderr)
        reset_optimizer_settings(t.state.opt, t.state.sched, t.cfg)
        if d.is_main:
            log = MetricsLog(t.run / METRICS)
            log.truncate_after(t.state.step)
            if changed:
                log.write({"kind": "resume", "step": t.state.step, "changed": changed, "message": "resumed with " +
                           ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())})
                log.close()


def reset_optimizer_settings(opt, sched, cfg) -> None:
    """A resume may change lr, momentum and weight decay: set them from the config over the checkpoint's."""
    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    sched.base_lrs = [cfg.lr for _ in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = cfg.lr * sched.lr_lambdas[0](sched.last_epoch)


def rank_state(t, state: dict) -> Optional[str]:
    """Put this rank's replay buffer and RNG state into ``state`` (in place). Same world size as the checkpoint: each
    rank gets its own back, exactly. Another world size: the saved buffers are pooled and dealt out again (every
    world_size-th chain), RNG states seeded afresh; returns a message saying so."""
    d, ranks, buffer = t.dist, state.get("ranks"), t.state.buffer
    saved_world = int(ranks["world_size"]) if isinstance(ranks, dict) else 1
    if saved_world == d.world_size:
        if d.enabled:
            state["buffer"], state["rng"] = ranks["buffers"][d.rank], ranks["rng"][d.rank]
        return None
    pooled = state["buffer"]["data"]
    mine = pooled[d.rank :: d.world_size][: len(buffer.data)].to(t.device)
    if len(mine) < len(buffer.data):  # fewer saved chains than this rank holds: the rest start afresh
        mine = torch.cat([mine, buffer.init.sample(len(buffer.data) - len(mine))])
    state["buffer"] = {"data": mine}
    torch.manual_seed(t.cfg.seed + t.rank_seed + int(state["step"]))
    state["rng"] = rng_state()
    return (f"checkpoint written by {saved_world} process(es), resumed by {d.world_size}: the {len(pooled)} saved "
            f"chains were dealt out again ({len(mine)} per process) and the random streams re-seeded, so this "
            f"resume does not reproduce an uninterrupted run")


LEGACY_KEYS = {"best_val": "Validation", "train_seconds": "Timer", "window": "MetricsWindow", "injected": "FaultInjection"}


def callback_states(state: dict, iters_per_epoch: int) -> dict:
    """The callbacks' states of a checkpoint; one written by jemtorch 0.1 kept them as top-level entries."""
    if "callbacks" in state:
        return state["callbacks"]
    out: dict = {}
    for key, name in LEGACY_KEYS.items():
        if key in state:
            out.setdefault(name, {})[key] = state[key]
    if "Timer" in out:  # 0.1 did not store it: known at an epoch's end, else judged from the mean epoch alone
        at_epoch_end = int(state["step"]) % iters_per_epoch == 0
        out["Timer"]["epoch_started_at"] = out["Timer"]["train_seconds"] if at_epoch_end else None
    return out
