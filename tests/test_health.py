"""Health of the generative half: the per-step statistics, the verdicts and warnings, and where they are shown."""
import json
from types import SimpleNamespace

import pytest
import torch

from jemtorch import JEM, Weights, create_model, jem_loss
from jemtorch.config import TrainConfig
from jemtorch.health import REACH_MIN, AdaptivePx, AdaptiveSteps, Health, healthy, overshot, pinned
from jemtorch.sampler import JEMSampler, ReplayBuffer


def test_reach_is_the_share_of_chain_ends_at_or_below_the_data_median_energy():
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=5))
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    samples = torch.rand(8, 1, 8, 8) * 2 - 1
    _, stats = jem_loss(jem, x, torch.arange(8) % 5, weights=Weights(), samples=samples)
    with torch.no_grad():
        e_data, e_samples = jem.energy(x), jem.energy(samples)
    assert stats["reach"].item() == pytest.approx((e_samples <= e_data.median()).float().mean().item())
    _, same = jem_loss(jem, x, torch.arange(8) % 5, weights=Weights(), samples=x)  # samples that are the data
    assert same["reach"].item() == pytest.approx(0.5)


def test_chain_travel_and_saturation():
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    sampler = JEMSampler(ReplayBuffer(20, (1, 8, 8), reinit_freq=0.0), step_size=1.0, noise=0.0, n_steps=0)
    sampler.sample(jem, 6)
    assert sampler.stats["travel"].item() == 0.0  # no step, no travel
    sampler.buffer.data.fill_(1.0)  # every pixel at the edge of the image range
    sampler.n_steps = 3
    sampler.update.clamp = (-1.0, 1.0)
    x = sampler.sample(jem, 6)
    assert 0 <= sampler.stats["saturation"].item() <= 1 and sampler.stats["travel"].item() > 0
    assert sampler.stats["travel"].item() == pytest.approx((x - 1).flatten(1).pow(2).mean(1).sqrt().mean().item(),
                                                           rel=1e-5)


def fake_trainer(cfg, energy_reg):
    events = []
    t = SimpleNamespace(cfg=cfg, state=SimpleNamespace(step=0), recovery=SimpleNamespace(energy_reg=energy_reg),
                        flags={}, last=False, emit=events.append)
    return t, events


def stepper(h: Health, t):
    """``steps(n, **values)``: n iterations of the fake trainer ``t`` with the same statistics, judged by ``h``."""
    def steps(n, **values):
        for _ in range(n):
            t.state.step += 1
            h.on_step_end(t, values)
    return steps


def test_health_warns_when_pinned_or_unreached_and_says_when_it_recovers():
    cfg = TrainConfig(log_every=5, p_x_weight=1.0, energy_reg=0.1)
    h = Health(cfg)
    t, events = fake_trainer(cfg, energy_reg=0.1)
    steps = stepper(h, t)

    steps(5, reach=0.4, energy_gap=-1.0)  # healthy: no record
    assert events == [] and t.flags["health"] == "ok"
    steps(5, reach=0.0, energy_gap=-9.95)  # the penalty's fixed point −w/λ = −10: pinned
    assert [e["status"] for e in events] == ["unhealthy"] and events[0]["pinned"] is True
    assert "fixed point −10" in events[0]["message"] and t.flags["health"] == "PINNED"
    steps(5, reach=0.05, energy_gap=-3.0)  # still unhealthy (unreached): no second warning
    assert len(events) == 1 and t.flags["health"] == "UNREACHED"
    steps(5, reach=0.5, energy_gap=0.1)
    assert [e["status"] for e in events] == ["unhealthy", "healthy"]
    steps(3, train_acc=1.0)  # classifier steps (no reach) are not judged
    assert h.summary()["health"]["healthy_fraction"] == pytest.approx(10 / 20)
    again = Health(cfg)
    again.load_state_dict(h.state_dict())
    assert again.summary() == h.summary()
    assert healthy({"reach": REACH_MIN}) and not healthy({"reach": REACH_MIN - 0.01})
    assert not healthy({"reach": 0.5, "energy_gap": -9.5}, 1.0, 0.1)  # reached, but held there by the penalty
    assert pinned(-9.0, 1.0, 0.1) and not pinned(-8.9, 1.0, 0.1) and not pinned(-50.0, 1.0, 0.0)
    assert not pinned(+9.5, 1.0, 0.1)  # chain ends below the data's energy: overshooting, not the penalty's fixed point


def test_chains_that_overshoot_the_data_are_warned_of_and_counted_apart_from_health():
    """A gap at the mirror of the fixed point, +w/λ: chain ends far below the data's energy. Healthy by the definition
    (reached, not pinned), yet a warning and a record when a window overshoots, one when it stops, and its share."""
    cfg = TrainConfig(log_every=5, p_x_weight=0.3, energy_reg=0.1)  # fixed point w/λ = 3
    h = Health(cfg)
    t, events = fake_trainer(cfg, energy_reg=0.1)
    steps = stepper(h, t)

    steps(5, reach=0.5, energy_gap=2.6)  # under 0.9·3: balanced enough, no record
    assert events == [] and t.flags["health"] == "ok"
    steps(5, reach=1.0, energy_gap=9.0)
    assert [e["status"] for e in events] == ["overshoot"] and "+9.00" in events[0]["message"]
    assert t.flags["health"] == "OVERSHOOT"
    steps(5, reach=1.0, energy_gap=12.0)  # still overshooting: no second record
    assert len(events) == 1
    steps(5, reach=0.5, energy_gap=0.2)
    assert [e["status"] for e in events] == ["overshoot", "balanced"] and t.flags["health"] == "ok"
    assert "90% or more of the penalty's fixed point 3" in events[0]["message"] and "under +2.7 " in events[1]["message"]
    summary = h.summary()["health"]
    assert summary["healthy_fraction"] == 1.0 and summary["overshoot_fraction"] == pytest.approx(10 / 20)
    again = Health(cfg)
    again.load_state_dict(h.state_dict())
    assert again.summary() == h.summary()
    assert overshot(2.7, 0.3, 0.1) and not overshot(2.6, 0.3, 0.1) and not overshot(50.0, 0.3, 0.0)
    assert not overshot(-9.5, 1.0, 0.1)  # the other side is pinned, not overshot


def test_a_pinned_run_says_so_on_screen_in_the_log_and_the_summary(tmp_path, capsys):
    from jemtorch.cli import main

    # a tiny JEM whose chains barely move (one step of a tiny step size) against a strong penalty: it pins
    assert main(["train", "--model", "cnn-4", "--sgld-steps", "1", "--sgld-lr", "0.001", "--buffer-size", "100",
                 "--epochs", "2", "--energy-reg", "0.5", "--energy-reg-form", "batch-mean", "--lr", "0.01",
                 "--warmup-iters", "0", "--log-every", "5", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    log = [json.loads(ln) for ln in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    warnings = [r for r in log if r["kind"] == "health" and r["status"] == "unhealthy"]
    assert warnings and "health warning" in err
    summary = json.loads((tmp_path / "r/summary.json").read_text())
    assert summary["health"]["healthy_fraction"] < 0.5


def test_adaptive_px_raises_the_scale_fast_when_chains_fall_behind_and_lowers_it_slowly():
    """--px-target-reach: the scale moves with the moving average of reach, within [minimum, 1], fast up, slow down;
    the loop reads t.px_scale, the log gets px_scale, and a resumed run continues from the stored state."""
    a = AdaptivePx(target=0.35, minimum=0.1)
    t = SimpleNamespace(px_scale=None)
    a.on_fit_start(t)
    assert t.px_scale == 1.0
    for _ in range(150):  # the chains keep up easily: the weight is lowered, slowly (halved in ~70 iterations)
        values = {"reach": 0.7}
        a.on_step_end(t, values)
    assert values["px_scale"] == t.px_scale and 0.15 < t.px_scale < 0.4
    low = t.px_scale
    a.on_step_end(t, {"train_acc": 1.0})  # a classifier step: nothing changes
    assert t.px_scale == low
    for _ in range(40):  # they fall behind: raised within a few dozen iterations, never above 1
        a.on_step_end(t, {"reach": 0.0})
    assert t.px_scale == 1.0
    b = AdaptivePx(0.35, 0.1)
    b.load_state_dict(a.state_dict())
    assert (b.scale, b.ema) == (a.scale, a.ema)
    for _ in range(2000):
        a.on_step_end(t, {"reach": 1.0})
    assert t.px_scale == 0.1  # the floor


def test_the_loop_scales_the_generative_terms_and_their_penalty_together(tmp_path, monkeypatch, capsys):
    import importlib

    train_mod = importlib.import_module("jemtorch.train")  # the module (jemtorch.train is also a function)
    from jemtorch.cli import main

    seen, holder = [], {}
    real = train_mod.forward_backward
    monkeypatch.setattr(train_mod, "forward_backward", lambda state, cfg, batch, w, ac, *rest: (
        seen.append((w, holder["t"].px_scale)), real(state, cfg, batch, w, ac, *rest))[1])
    cfg = TrainConfig(dataset="digits", model="cnn-4", epochs=1, max_iters=30, sgld_steps=1, buffer_size=100, energy_reg=0.1,
                      px_start_epoch=0, px_ramp_epochs=0.0, warmup_iters=0, px_target_reach=0.35, progress=False,
                      out=str(tmp_path / "r"))
    holder["t"] = t = train_mod.Trainer(cfg)
    t.fit()
    scales = [json.loads(ln).get("px_scale") for ln in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert any(s is not None for s in scales) and all(0.1 <= s <= 1 for s in scales if s is not None)
    assert len(seen) > 10 and seen[0][1] == 1.0  # the configured weights first
    for w, scale in seen:  # every step: p(x) and the energy penalty scaled alike, by the scale of that moment
        assert w.px == pytest.approx(scale) and w.energy_reg == pytest.approx(0.1 * scale)
    assert main(["train", "--px-target-reach", "1.5", "--out", str(tmp_path / "bad")]) != 0
    assert "--px-target-reach must be in [0, 1)" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_adaptive_steps_lengthens_the_chains_when_they_fall_behind_and_never_shortens_them(tmp_path, capsys):
    """--sgld-steps-max: one more chain step while the reach average is below the target, at most once per cooldown,
    up to the maximum; none while the chains keep up; the sampler's n_steps follows; a resumed run keeps the length."""
    a = AdaptiveSteps(maximum=8)
    t = SimpleNamespace(state=SimpleNamespace(sampler=SimpleNamespace(n_steps=5)))
    a.on_fit_start(t)
    for _ in range(200):  # the chains keep up: five steps stay five
        values = {"reach": 0.55}
        a.on_step_end(t, values)
    assert t.state.sampler.n_steps == 5 and values["sgld_steps"] == 5
    a.on_step_end(t, {"train_acc": 1.0})  # a classifier step: nothing changes
    grown = []
    for _ in range(3 * AdaptiveSteps.COOLDOWN):  # they fall behind: a step per cooldown, not one per iteration
        a.on_step_end(t, {"reach": 0.1})
        grown.append(t.state.sampler.n_steps)
    assert 6 <= grown[-1] <= 8 and grown == sorted(grown) and len(set(grown)) <= 4
    for _ in range(500):
        a.on_step_end(t, {"reach": 0.0})
    assert t.state.sampler.n_steps == 8  # the maximum
    for _ in range(500):  # they keep up again: never shortened
        a.on_step_end(t, {"reach": 0.9})
    assert t.state.sampler.n_steps == 8
    b = AdaptiveSteps(8)
    b.load_state_dict(a.state_dict())
    fresh = SimpleNamespace(state=SimpleNamespace(sampler=SimpleNamespace(n_steps=5)))
    b.on_fit_start(fresh)  # a resumed run: the checkpoint's length, not the configured one
    assert fresh.state.sampler.n_steps == 8
    from jemtorch.cli import main

    assert main(["train", "--sgld-steps", "5", "--sgld-steps-max", "3", "--out", str(tmp_path / "bad")]) != 0
    assert "--sgld-steps-max must be 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    from jemtorch.sampler import SamplerSettings  # the flag's help states the controller's target, not a stale copy

    assert f"reach below {AdaptiveSteps.TARGET}" in SamplerSettings.__dataclass_fields__["sgld_steps_max"].metadata["help"]


def test_the_loop_runs_the_chains_adaptive_steps_sets(tmp_path, monkeypatch):
    """With --sgld-steps-max the loop's sampler takes the length AdaptiveSteps sets (here: a target no chain meets, so
    the chains grow every cooldown), metrics.jsonl logs it, and the checkpoint keeps it."""
    import importlib

    train_mod = importlib.import_module("jemtorch.train")
    monkeypatch.setattr(AdaptiveSteps, "TARGET", 1.01)
    monkeypatch.setattr(AdaptiveSteps, "COOLDOWN", 5)
    lengths = []
    real = JEMSampler.run_chains
    monkeypatch.setattr(JEMSampler, "run_chains", lambda self, jem, x0, y=None, n_steps=None, callback=None: (
        lengths.append(self.n_steps if n_steps is None else n_steps), real(self, jem, x0, y, n_steps, callback))[1])
    cfg = TrainConfig(dataset="digits", model="cnn-4", epochs=1, max_iters=24, sgld_steps=1, sgld_steps_max=4,
                      buffer_size=100, energy_reg=0.1, px_start_epoch=0, px_ramp_epochs=0.0, warmup_iters=0,
                      log_every=4, progress=False, out=str(tmp_path / "r"))
    t = train_mod.Trainer(cfg)
    t.fit()
    assert lengths[0] == 1 and lengths[-1] == 4 and lengths == sorted(lengths)
    logged = [json.loads(ln).get("sgld_steps") for ln in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert max(v for v in logged if v is not None) > 1
    saved = torch.load(t.run.checkpoint, weights_only=True)["callbacks"]["AdaptiveSteps"]
    assert saved["steps"] == 4
