"""Is the generative half of a JEM training? Health signals from the field's practice, judged at every iteration.

Maximum-likelihood training of an energy-based model drives E(data) and E(samples) together: its gradient
E_data[∇θ E] − E_model[∇θ E] vanishes only when the model's samples look like the data (Hinton 2002; Du & Mordatch
2019; Nijkamp et al. 2020, "On the anatomy of MCMC-based maximum likelihood learning of EBMs"). When the sampler
cannot keep up, the p(x) term turns into a classifier of data against chain ends: E(data) falls, E(samples) rises
until a penalty stops them, and the model learns nothing more about p(x). The per-step statistics
(``objective.jem_loss`` and ``sampler.JEMSampler`` compute them):

    reach       share of this step's chain ends whose energy is at or below the median energy of the p(x) data
                batch. Samples of the model have the data's energies: about 0.5. Near 0, no chain gets where the
                data is. Scale-free: no energy penalty can make it look better.
    travel      root-mean-square distance per pixel (pixels in [−1, 1]) between a chain's start and its end in this
                iteration: chains that do not move cannot follow the model.
    saturation  share of chain-end pixels at the edge of the image range (|x| ≥ 0.99): steps too large.
    pinned      (judged here) E(data) − E(samples) at ≥ 90% of the energy penalty's fixed point −w/λ: the minimum of
                w·(Ē_d − Ē_s) + λ·(Ē_d² + Ē_s²) is Ē_d = −w/(2λ), Ē_s = +w/(2λ), where the penalty, not the data,
                sets the energies.
    overshoot   (judged here, apart from health) E(data) − E(samples) at ≥ 90% of +w/λ: the chain ends sit that far
                *below* the data's energy, samples the model rates likelier than its data, and the p(x) term does not
                pull them back (as when only the logits' shift trains it: --px-tail-grad logit-shift without a leak).
                Such iterations reach the data and are not pinned, so they count as healthy; ``Health`` warns of a
                log window whose mean gap overshoots, and ``summary.json`` records their share
                (``health.overshoot_fraction``).

An iteration of the generative phase is **healthy** when reach ≥ ``REACH_MIN`` (one chain end in five at or below
the data's median energy; a model's own samples: one in two) and the gap is not pinned (so that no penalty can make
an iteration healthy by holding the energies together). ``Health`` counts healthy iterations (``summary.json``:
``health.healthy_fraction``), warns on screen and in metrics.jsonl (``kind: health``) when a log window is mostly
unhealthy or pinned, and says so again when it recovers.

``AdaptivePx`` (``--px-target-reach``) acts on the same signal: it scales the generative terms (and the energy
penalty with them, so the fixed point w/λ stays where health looks for it) to hold reach at a target. A stronger
classifier tells chain ends from data sooner; once it does, the gap runs to the fixed point within ~100 iterations
and stays there (docs/results/density.md). The scale therefore rises fast when reach falls below the target and
falls slowly while the chains keep up: the run looks for the smallest p(x) weight at which the chains still follow.

``AdaptiveSteps`` (``--sgld-steps-max``) acts on it the other way: it lengthens the chains instead of weakening the
term. Each time the chains got more steps the switch came later (weight 0.3 pinned at iteration ~1560 with two
steps and stayed healthy with five; weight 0.2 with five pinned at ~3000), so the chains grow, one step at a time,
as the classifier strengthens. Measured: it grows them within ~100 iterations of the first sign and the run pins
anyway (weights 0.2 and 0.1, five to twelve steps; docs/results/density.md) — a tool to study the switch, not a cure.
"""
from __future__ import annotations

import math
from typing import Optional

from .callbacks import Callback

REACH_MIN = 0.2
PINNED_AT = 0.9  # share of the penalty's fixed point w/λ at which the gap counts as pinned
WINDOW_BAD = 0.5  # a log window with fewer healthy iterations than this share raises the warning


def healthy(values: dict, p_x_weight: float = 1.0, energy_reg: float = 0.0) -> bool:
    """One generative iteration's verdict from its statistics: ``reach``, and the gap off the penalty's fixed point."""
    return values.get("reach", 0.0) >= REACH_MIN and not pinned(values.get("energy_gap", 0.0), p_x_weight, energy_reg)


def fixed_point(p_x_weight: float, energy_reg: float) -> Optional[float]:
    """w/λ: the size of the energy gap at which the penalised p(x) loss stops moving the energies (None: no penalty)."""
    return p_x_weight / energy_reg if energy_reg > 0 else None


def pinned(gap: float, p_x_weight: float, energy_reg: float) -> bool:
    """Is the energy gap E(data) − E(samples) at the penalty's fixed point −w/λ (within ``PINNED_AT``)? A positive gap
    (chain ends below the data's energy, as when the chains overshoot early on) is the other way round: not pinned
    (``overshot``)."""
    fixed = fixed_point(p_x_weight, energy_reg)
    return fixed is not None and p_x_weight > 0 and gap <= -PINNED_AT * fixed


def overshot(gap: float, p_x_weight: float, energy_reg: float) -> bool:
    """Is the energy gap at the mirror of the fixed point, +w/λ (within ``PINNED_AT``): chain ends that far below the
    data's energy? ``pinned`` with the gap's sign turned."""
    return pinned(-gap, p_x_weight, energy_reg)


def moving_average(average: Optional[float], value: float, rate: float) -> float:
    """Exponential moving average of ``value`` (the first value starts it); the adaptive callbacks smooth reach with it."""
    return value if average is None else (1 - rate) * average + rate * value


class Health(Callback):
    """Counts healthy iterations of the generative phase; a ``health`` record and a warning when a log window turns
    unhealthy (and when it recovers); ``summary()`` for summary.json."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.iterations = 0  # generative iterations so far
        self.healthy = 0
        self.window: list[bool] = []  # verdicts since the last log record
        self.gaps: list[float] = []
        self.warned = False  # the last health record was a warning
        self.overshoots = 0  # generative iterations whose gap overshot (not counted against health)
        self.warned_over = False  # the last overshoot record was a warning

    def on_rollback(self, t) -> None:
        self.window.clear()
        self.gaps.clear()

    def on_step_end(self, t, values: dict) -> None:
        if "reach" not in values:  # a classifier step (baseline, or before --px-start-epoch)
            return
        ok = healthy(values, self.cfg.p_x_weight, t.recovery.energy_reg)
        self.iterations += 1
        self.healthy += ok
        self.overshoots += overshot(values.get("energy_gap", 0.0), self.cfg.p_x_weight, t.recovery.energy_reg)
        self.window.append(ok)
        self.gaps.append(values.get("energy_gap", 0.0))
        if t.state.step % self.cfg.log_every == 0 or t.last:
            self.judge(t, values)

    def judge(self, t, values: dict) -> None:
        share = sum(self.window) / len(self.window)
        gap = sum(self.gaps) / len(self.gaps)
        is_pinned = pinned(gap, self.cfg.p_x_weight, t.recovery.energy_reg)
        bad = share < WINDOW_BAD or is_pinned
        self.window.clear()
        self.gaps.clear()
        is_over = not bad and overshot(gap, self.cfg.p_x_weight, t.recovery.energy_reg)
        t.flags["health"] = ("PINNED" if is_pinned else "UNREACHED") if bad else "OVERSHOOT" if is_over else "ok"
        if is_over != self.warned_over:
            self.overshoot_record(t, is_over, gap)
        if bad == self.warned:
            return
        self.warned = bad
        fixed = fixed_point(self.cfg.p_x_weight, t.recovery.energy_reg)
        what = (f"the p(x) term is pinned: energy gap {gap:.2f} at the energy penalty's fixed point −{fixed:g}"
                if is_pinned else f"the samples do not reach the data's energy: {share:.0%} of the last iterations "
                                  f"healthy")
        t.emit({"kind": "health", "step": t.state.step, "status": "unhealthy" if bad else "healthy",
                "healthy_share": share, "energy_gap": gap, "pinned": is_pinned, "penalty_fixed_point": fixed,
                "message": (f"health warning at iteration {t.state.step}: {what} (reach "
                            f"{values['reach']:.2f}, travel {values.get('travel', 0):.3g}); see README, Health")
                if bad else f"health: healthy again at iteration {t.state.step} ({share:.0%} of the last iterations)"})

    def overshoot_record(self, t, is_over: bool, gap: float) -> None:
        """A ``health`` record (status ``overshoot``) when a log window's mean gap starts to overshoot +w/λ, and one
        (``balanced``) when it stops."""
        self.warned_over = is_over
        fixed = fixed_point(self.cfg.p_x_weight, t.recovery.energy_reg)
        t.emit({"kind": "health", "step": t.state.step, "status": "overshoot" if is_over else "balanced",
                "energy_gap": gap, "penalty_fixed_point": fixed,
                "message": (f"health warning at iteration {t.state.step}: the chains overshoot: energy gap {gap:+.2f}, "
                            f"their ends below the data's energy by {PINNED_AT:.0%} or more of the penalty's fixed point "
                            f"{fixed:g} (samples rated likelier than the data); see README, Health") if is_over
                else f"health: the energy gap is back under +{PINNED_AT * fixed:.3g} at iteration {t.state.step} "
                     f"({gap:+.2f})"})

    def summary(self) -> dict:
        if not self.iterations:
            return {}
        return {"health": {"healthy_fraction": self.healthy / self.iterations, "generative_iterations": self.iterations,
                           "overshoot_fraction": self.overshoots / self.iterations,
                           "definition": f"reach >= {REACH_MIN} (share of chain ends at or below the data batch's median "
                                         f"energy) and the energy gap off the penalty's fixed point (jemtorch/health.py)"}}

    def state_dict(self) -> dict:
        return {"iterations": self.iterations, "healthy": self.healthy, "window": list(self.window),
                "gaps": list(self.gaps), "warned": self.warned, "overshoots": self.overshoots,
                "warned_over": self.warned_over}

    def load_state_dict(self, state: dict) -> None:
        self.iterations, self.healthy = int(state["iterations"]), int(state["healthy"])
        self.window = [bool(v) for v in state.get("window", [])]
        self.gaps = [float(v) for v in state.get("gaps", [])]
        self.warned = bool(state.get("warned", False))
        self.overshoots = int(state.get("overshoots", 0))  # checkpoints before the count: from their resume on
        self.warned_over = bool(state.get("warned_over", False))


class AdaptivePx(Callback):
    """Scales the generative terms to hold ``reach`` (its moving average over ~20 iterations) at ``target``:
    scale ← clip(scale · exp(rate · (target − reach) / target), minimum, 1), with rate ``UP`` when the chains fall
    behind and ``DOWN`` when they keep up. Starts at 1 (the configured weights). Sets ``t.px_scale`` (read by the
    loop for the next step) and logs ``px_scale`` with the step's values."""

    UP, DOWN, EMA = 0.2, 0.01, 0.05  # doubles in ~4 iterations at reach 0, halves in ~70 at twice the target

    def __init__(self, target: float, minimum: float):
        self.target, self.minimum = target, minimum
        self.scale, self.ema = 1.0, None

    def on_fit_start(self, t) -> None:
        t.px_scale = self.scale

    def on_step_end(self, t, values: dict) -> None:
        if "reach" not in values:
            return
        r = values["reach"]
        self.ema = moving_average(self.ema, r, self.EMA)
        err = (self.target - self.ema) / self.target
        self.scale = min(1.0, max(self.minimum, self.scale * math.exp((self.UP if err > 0 else self.DOWN) * err)))
        t.px_scale = values["px_scale"] = self.scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.ema = float(state["scale"]), state.get("ema")


class AdaptiveSteps(Callback):
    """Lengthens the chains when they fall behind: one more chain step per iteration (up to ``maximum``) whenever the
    moving average of ``reach`` (~10 iterations) is below ``TARGET``, at most once per ``COOLDOWN`` iterations (the
    time a new step takes to show in reach). Never shortens them: the classifier only gets stronger. Sets the
    sampler's ``n_steps`` and logs ``sgld_steps`` with the step's values."""

    # Healthy runs hold reach at 0.5–0.55 (weight 0.3 with five steps, seeds 0 and 1); the two-step weight-0.3 run
    # sat at 0.40–0.45 for ~800 iterations before it pinned, and the five-step weight-0.2 run fell from 0.55 to
    # 0.42 within 20 iterations at its switch (docs/results/density.md).
    TARGET, EMA, COOLDOWN = 0.45, 0.1, 20

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.steps: Optional[int] = None  # the chains' current length (None: the configured --sgld-steps)
        self.ema: Optional[float] = None
        self.since = 0  # iterations since the last step was added

    def on_fit_start(self, t) -> None:
        if self.steps is None:
            self.steps = t.state.sampler.n_steps
        t.state.sampler.n_steps = self.steps

    def on_step_end(self, t, values: dict) -> None:
        if "reach" not in values:
            return
        r = values["reach"]
        self.ema = moving_average(self.ema, r, self.EMA)
        self.since += 1
        if self.ema < self.TARGET and self.since >= self.COOLDOWN and self.steps < self.maximum:
            self.steps, self.since = self.steps + 1, 0
            t.state.sampler.n_steps = self.steps
        values["sgld_steps"] = float(self.steps)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "ema": self.ema, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.ema, self.since = state.get("steps"), state.get("ema"), int(state.get("since", 0))
