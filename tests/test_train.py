import importlib
import json
from pathlib import Path

import pytest
import torch

from jemtorch import TrainConfig, Trainer, train
from jemtorch.checkpoint import CheckpointError, load_safe
from jemtorch.train import training_batch

TINY = dict(dataset="digits", model="cnn-8", sgld_steps=2, buffer_size=200, batch_size=32, warmup_iters=0, lr=1e-3,
            progress=False, log_every=5, n_valid=100)


def cfg(tmp_path, **kw):
    return TrainConfig(**{**TINY, "out": str(tmp_path), **kw})


def test_short_training_lowers_the_loss(tmp_path):
    summary = train(cfg(tmp_path / "r", epochs=3, lr=5e-3))  # 3 × 42 iterations of cnn-8
    recs = [json.loads(l) for l in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert train_recs[-1]["l_clf"] < train_recs[0]["l_clf"] - 0.5
    assert summary["test_accuracy"] > 0.5
    for key in ("test_accuracy", "train_seconds", "iterations", "dataset", "model"):
        assert key in summary
    for rec in train_recs:
        assert {"loss", "l_clf", "l_px", "energy_gap", "e_data", "e_samples", "train_acc", "lr", "reach", "travel",
                "saturation"} <= set(rec)
    assert 0 <= summary["health"]["healthy_fraction"] <= 1 and summary["health"]["generative_iterations"] == summary["iterations"]
    run = tmp_path / "r"
    for name in ("config.json", "checkpoint.pt", "best.pt", "summary.json", "samples_uncond.png", "samples_cond.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["sgld_steps"] == 2


def test_baseline_uses_no_samples(tmp_path):
    trainer = Trainer(cfg(tmp_path, p_x_weight=0, epochs=1))
    before = trainer.state.buffer.data.clone()
    values = trainer.iteration()
    assert "energy_gap" not in values and torch.equal(trainer.state.buffer.data, before)


@pytest.mark.parametrize("kw", [dict(p_x_y_weight=1.0, p_x_weight=0.0), dict(p_x_y_weight=0.5, class_cond_buffer=True),
                                dict(labels_per_class=5)])
def test_variants_train(tmp_path, kw):
    trainer = Trainer(cfg(tmp_path, epochs=1, **kw))
    for _ in range(3):
        values = trainer.iteration()
    assert all(v == v for v in values.values())  # finite, not NaN
    if "p_x_y_weight" in kw:
        assert "l_pxy" in values
    if kw.get("p_x_weight") == 0.0:
        assert trainer.state.buffer.class_conditional
    if "labels_per_class" in kw:
        assert len(trainer.labeled.x) == 50 and len(trainer.unlabeled.x) == len(trainer.splits.x_train)


def test_pseudo_label_baseline_trains_on_the_unlabelled_stream_with_its_weight_ramped(tmp_path):
    t = Trainer(cfg(tmp_path, epochs=2, labels_per_class=5, p_x_weight=0, pseudo_label_weight=2.0,
                    pseudo_label_warmup=0.5, pseudo_label_threshold=0.5))
    ramp = round(0.5 * t.clock.total_iters)
    assert t.phases.pl_ramp == ramp and t.phases.weights(t.recovery.weights, 0).pl == pytest.approx(2.0 / ramp)
    assert t.phases.weights(t.recovery.weights, ramp).pl == 2.0
    x, y, x_px = training_batch(t.cfg, t.labeled, t.unlabeled, 0, t.pad, t.flip)
    assert x_px is not None and len(x_px) == len(x)  # a baseline draws the unlabelled batch for the term
    before = t.state.buffer.data.clone()
    values = [t.iteration() for _ in range(3)][-1]
    assert {"l_pl", "pl_mask"} <= set(values) and "energy_gap" not in values
    assert torch.equal(t.state.buffer.data, before)  # still a classifier: no samples drawn
    with pytest.raises(ValueError, match="needs unlabelled images"):
        TrainConfig(pseudo_label_weight=1.0)


def test_vat_baseline_ramps_its_weight_and_logs_its_terms(tmp_path):
    t = Trainer(cfg(tmp_path, epochs=2, labels_per_class=5, p_x_weight=0, vat_weight=2.0, pseudo_label_warmup=0.5))
    ramp = round(0.5 * t.clock.total_iters)
    w0 = t.phases.weights(t.recovery.weights, 0)
    assert w0.vat == pytest.approx(2.0 / ramp) and w0.vat_ent == 0.06 and w0.pl == 0.0
    assert t.phases.weights(t.recovery.weights, ramp).vat == 2.0
    before = t.state.buffer.data.clone()
    values = [t.iteration() for _ in range(3)][-1]
    assert {"l_vat", "l_ent"} <= set(values) and "energy_gap" not in values and values["l_vat"] > -1e-6  # a KL (float noise at 0)
    assert torch.equal(t.state.buffer.data, before)  # a classifier: no samples drawn
    with pytest.raises(ValueError, match="needs unlabelled images"):
        TrainConfig(vat_weight=1.0)
    with pytest.raises(ValueError, match="--vat-eps must be > 0"):
        TrainConfig(labels_per_class=5, vat_weight=1.0, vat_eps=0)


def test_lr_schedule(tmp_path):
    t = Trainer(cfg(tmp_path, warmup_iters=10, decay_epochs=(2,), decay_rate=0.1, epochs=3))
    ipe = t.clock.iters_per_epoch
    assert t.state.sched.lr_lambdas[0](0) == pytest.approx(0.1) and t.state.sched.lr_lambdas[0](9) == 1.0
    assert t.state.sched.lr_lambdas[0](2 * ipe) == pytest.approx(0.1)


def test_resume_equals_uninterrupted(tmp_path):
    full = train(cfg(tmp_path / "a", epochs=2))
    train(cfg(tmp_path / "b", epochs=2, max_iters=50))  # stops mid-epoch (41 iterations per epoch)
    resumed = Trainer(cfg(tmp_path / "b", epochs=2))
    resumed.resume()
    assert resumed.state.step == 50
    out = resumed.fit()
    for key in ("test_accuracy", "test_nll", "test_accuracy_last", "best_val_accuracy", "iterations"):
        assert out[key] == full[key], key
    a, b = (load_safe(tmp_path / r / "checkpoint.pt") for r in ("a", "b"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "time"} for l in p.read_text().splitlines()]
    assert strip(tmp_path / "a/metrics.jsonl") == strip(tmp_path / "b/metrics.jsonl")


def test_time_limit_ends_the_run_like_its_last_iteration(tmp_path):
    out = train(cfg(tmp_path, epochs=3, time_limit=1e-6))  # spent after the first iteration
    assert out["iterations"] == 1 and out["time_limited"] is True
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs if r["kind"] not in ("train", "health")] == ["time_limit", "eval"]
    assert (tmp_path / "best.pt").is_file() and load_safe(tmp_path / "checkpoint.pt")["step"] == 1
    assert train(cfg(tmp_path / "free", epochs=1))["time_limited"] is False


def test_time_limit_stops_after_the_last_epoch_that_fits(tmp_path):
    t = Trainer(cfg(tmp_path, epochs=5, time_limit=100.0))
    ipe = t.clock.iters_per_epoch
    t.state.step, t.timer.seconds = ipe, 30.0  # epoch 1 took 30 s: a second fits (60 ≤ 100)
    assert not t.timer.out_of_time(t, epoch_done=True)
    t.state.step, t.timer.seconds = 2 * ipe, 75.0  # epoch 2 took 45 s: a third (≥ 45 s) would end at 120 > 100
    assert t.timer.out_of_time(t, epoch_done=True)
    t.state.step, t.timer.seconds = 2 * ipe + 1, 99.0  # within an epoch: only a spent budget stops
    assert not t.timer.out_of_time(t, epoch_done=False)
    t.timer.seconds = 100.0
    assert t.timer.out_of_time(t, epoch_done=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(cfg(tmp_path, epochs=1))
    ck = tmp_path / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        Trainer(cfg(tmp_path, epochs=1)).resume()


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_safe(tmp_path / "evil.pt")


def test_divergence_climbs_the_recovery_ladder_then_stops(tmp_path):
    from jemtorch.recovery import TrainingDiverged

    t = Trainer(cfg(tmp_path, epochs=1, snapshot_every=3, snapshots_kept=5, energy_reg=0.0))
    t.recovery.take_snapshot(t.state)
    for _ in range(9):
        t.iteration()
    assert [s["step"] for s in t.recovery.snapshots] == [0, 3, 6, 9]
    snap = t.recovery.snapshots[-1]
    snap_model = {k: v.clone() for k, v in snap["model"].items()}
    snap_buffer = snap["buffer"].clone()
    t.cfg.max_energy_gap = 1e-9  # every step now counts as divergence
    values = t.iteration()
    # rung 1: the newest snapshot, lr halved, nothing else touched
    assert values["rollback"] == 1.0 and t.state.step == 9 and t.recovery.count == 1 and t.recovery.lr_scale == 0.5
    assert all(torch.equal(v, snap_model[k]) for k, v in t.state.jem.f.state_dict().items())
    assert torch.equal(t.state.buffer.data, snap_buffer)
    assert t.state.opt.param_groups[0]["lr"] == pytest.approx(0.5 * 1e-3)
    # soon after: rung 2 goes one snapshot further back (the newest is never restored twice) and refreshes chains
    t.iteration()
    assert t.state.step == 6 and t.recovery.level == 2 and not torch.equal(t.state.buffer.data, t.recovery.snapshots[-1]["buffer"])
    t.iteration()
    assert t.state.step == 3 and t.recovery.energy_reg == 0.1  # rung 3: energy penalty
    step_before = t.state.sampler.update.step_size
    t.iteration()
    assert t.state.step == 0 and t.state.sampler.update.step_size == 0.5 * step_before  # rung 4: smaller sampler step
    with pytest.raises(TrainingDiverged, match="cannot recover"):
        t.iteration()


def test_injected_divergences_recover_and_are_logged(tmp_path):
    run = tmp_path / "r"
    summary = train(cfg(run, epochs=3, snapshot_every=10, inject_divergence=(15, 40, 41, 90)))
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in recs if r["kind"] == "rollback"]
    # 40 rolls back to the snapshot taken at 40; 41 follows at once, so rung 2 goes back one snapshot further (30)
    assert [(r["diverged_at"], r["step"], r["rung"]) for r in rollbacks] == [(15, 10, 1), (40, 40, 1), (41, 30, 2),
                                                                            (90, 90, 1)]
    assert summary["rollbacks"] == 4 and summary["epochs"] == 3
    assert [r["lr_scale"] for r in recs if r["kind"] == "recovery"][-1] == 1.0  # the lr came back after each
    assert (run / "curves.png").is_file()


def test_an_lr_that_diverges_soon_after_its_return_stays_lowered(tmp_path):
    """The ladder raises the lr back after a healthy stretch; when that brings the divergence back within
    2·snapshot_every iterations, the halved lr becomes a ceiling for the rest of the run (a CIFAR-10 run without
    normalisation diverged 12-63 iterations after each return to lr 0.1 and climbed to rung 4)."""
    run = tmp_path / "r"
    train(cfg(run, epochs=3, snapshot_every=10, inject_divergence=(15, 25, 80)))
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in recs if r["kind"] == "rollback"]
    assert [(r["diverged_at"], r["step"], r["rung"], r["lr_ceiling"]) for r in rollbacks] == [
        (15, 10, 1, 1.0), (25, 20, 2, 0.5), (80, 80, 1, 0.5)]  # 25: five iterations after the lr came back at 20
    assert "lr ×0.5 at most from now on" in rollbacks[1]["message"] and "lr ×0.25" in rollbacks[2]["message"]
    assert [r["lr_scale"] for r in recs if r["kind"] == "recovery"] == [1.0, 0.5]  # up to the ceiling, not past it
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["recovery"]
    assert saved["lr_ceiling"] == 0.5  # a resumed run keeps it


def test_config_validation():
    for bad in (dict(sgld_steps=-1), dict(reinit_freq=2.0), dict(lr=0), dict(optimizer="rmsprop"),
                dict(p_y_given_x_weight=0, p_x_weight=0), dict(labels_per_class=0), dict(norm="group")):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="unknown config entries"):
        TrainConfig.from_dict({"sgld_stepz": 3})


def test_dataset_presets_sit_under_explicit_values():
    from jemtorch import make_config

    d = make_config()
    assert (d.dataset, d.model, d.lr, d.sgld_steps, d.sgld_lr, d.sgld_std, d.reinit_freq) == ("digits", "cnn", 1e-3, 10, 1.0, 0.01, 0.05)
    assert make_config(lr=5e-4).lr == 5e-4
    c = make_config(dataset="cifar10")
    assert (c.model, c.lr, c.warmup_iters, c.decay_epochs, c.buffer_size, c.data_noise) == (
        "wrn-28-10", 1e-4, 1000, (160, 180), 10000, 0.03)


def test_energy_regulariser_adds_squared_energies():
    from jemtorch import JEM, Weights, create_model, jem_loss

    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=10))
    x, x_q = torch.rand(8, 1, 8, 8) * 2 - 1, torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.arange(8) % 10
    l0, _ = jem_loss(jem, x, y, weights=Weights(), samples=x_q)
    l1, _ = jem_loss(jem, x, y, weights=Weights(energy_reg=0.5), samples=x_q)
    with torch.no_grad():
        expected = 0.5 * (jem.energy(x).pow(2).mean() + jem.energy(x_q).pow(2).mean())
    assert (l1 - l0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_recipes_set_official_values_and_flags_still_win():
    from jemtorch import make_config

    s = make_config(dataset="cifar10", recipe="sadajem")
    assert (s.sgld_update, s.sgld_steps, s.sgld_init, s.sample_mode, s.sam_rho, s.px_augment, s.optimizer, s.lr,
            s.weight_decay, s.decay_epochs) == ("clamped", 5, "gmm", "train", 2.0, False, "sgd", 0.1, 5e-4, (60, 120, 180))
    assert (s.batch_size, s.px_batch_size) == (128, 64)  # train_sadajem.py: 128 labelled, 64 for p(x) and chains
    j = make_config(dataset="cifar10", recipe="jempp", pyld_lr=0.1)
    assert (j.sgld_update, j.pyld_inner_steps, j.pyld_lr, j.weight_decay, j.norm) == ("pyld", 5, 0.1, 4e-4, "batch")
    assert make_config(dataset="cifar10").recipe == "jem"
    f = make_config(dataset="fashion-mnist")  # the preset's measured choices (presets/fashion-mnist.toml)
    assert (f.recipe, f.epochs, f.sgld_steps, f.sgld_lr, f.clip_grad, f.energy_reg, f.energy_reg_form,
            f.px_ramp_epochs) == ("sadajem", 16, 2, 1.0, 3.0, 0.1, "batch-mean", 1.0)
    with pytest.raises(ValueError, match="--recipe must be one of"):
        make_config(recipe="jem3")
    with pytest.raises(ValueError, match="--energy-reg-form must be one of per-example, batch-mean"):
        make_config(energy_reg_form="per-sample")


def test_sam_moves_to_the_sharp_point_and_back():
    from jemtorch.optim import SAM

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    base = torch.optim.SGD([w], lr=0.1)
    sam = SAM(base, rho=0.5, adaptive=False)
    (w ** 2).sum().backward()  # grad (2, −4)
    sam.first_step()
    g = torch.tensor([2.0, -4.0])
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0]) + 0.5 * g / g.norm())
    (w ** 2).sum().backward()
    w_sharp_grad = w.grad.clone()
    sam.second_step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0]) - 0.1 * w_sharp_grad)


@pytest.mark.parametrize("sam_tail", [True, False])
def test_sam_tail_false_takes_plain_steps_past_px_stop_epoch(tmp_path, sam_tail):
    t = Trainer(cfg(tmp_path, epochs=2, px_stop_epoch=1, sam_rho=0.5, sam_tail=sam_tail))
    calls = []
    first = t.state.sam.first_step
    t.state.sam.first_step = lambda: (calls.append(t.state.step), first())
    t.iteration()
    t.state.step = t.clock.iters_per_epoch  # the first step of the tail
    t.iteration()
    assert calls == ([0, t.clock.iters_per_epoch] if sam_tail else [0])


@pytest.mark.parametrize("recipe", ["jempp", "sadajem"])
def test_modern_recipes_train(tmp_path, recipe):
    t = Trainer(cfg(tmp_path, recipe=recipe, epochs=1, lr=0.01, warmup_iters=5, norm="batch", separate_forward=True,
                    sample_mode="train", sgld_init="gmm", sgld_steps=2))
    for _ in range(4):
        values = t.iteration()
    assert t.state.step == 4 and all(v == v for v in values.values()) and values["sgld_grad_norm"] > 0


def test_px_start_epoch_trains_the_classifier_alone_first(tmp_path):
    t = Trainer(cfg(tmp_path, epochs=2, px_start_epoch=1))
    before = t.state.buffer.data.clone()
    values = t.iteration()
    assert "l_px" not in values and torch.equal(t.state.buffer.data, before)  # no chains moved
    t.state.step = t.clock.iters_per_epoch
    assert "l_px" in t.iteration() and not torch.equal(t.state.buffer.data, before)
    summary = train(cfg(tmp_path / "r", epochs=2, px_start_epoch=1))
    best = torch.load(tmp_path / "r/best.pt", weights_only=True)
    assert best["step"] == 2 * t.clock.iters_per_epoch and summary["epochs"] == 2  # best chosen among JEM epochs only


def test_px_stop_epoch_ends_with_the_classifier_alone(tmp_path):
    t = Trainer(cfg(tmp_path, epochs=3, px_start_epoch=1, px_stop_epoch=2))
    per = t.clock.iters_per_epoch
    assert [t.phases.generative(s) for s in (0, per, 2 * per - 1, 2 * per)] == [False, True, True, False]
    t.state.step = 2 * per
    before = t.state.buffer.data.clone()
    assert "l_px" not in t.iteration() and torch.equal(t.state.buffer.data, before)  # the tail moves no chains
    summary = train(cfg(tmp_path / "r", epochs=3, px_start_epoch=1, px_stop_epoch=2))
    assert summary["health"]["generative_iterations"] == per  # only epoch 2 trained the density
    assert torch.load(tmp_path / "r/best.pt", weights_only=True)["step"] in (2 * per, 3 * per)  # the tail counts
    for bad in (1, 4):  # not after the start, not past the end
        with pytest.raises(ValueError, match=r"--px-stop-epoch must be -1 or in .*\(2\.\.3\)"):
            cfg(tmp_path, epochs=3, px_start_epoch=1, px_stop_epoch=bad)


def test_px_tail_scale_keeps_the_density_training_at_a_share_of_its_weights(tmp_path):
    from jemtorch.objective import Weights

    t = Trainer(cfg(tmp_path, epochs=3, px_start_epoch=1, px_stop_epoch=2, px_tail_scale=0.25))
    per, w = t.clock.iters_per_epoch, Weights(1.0, 0.4, 0.0, 1.0, "squared")
    assert [t.phases.weights(w, s).px for s in (0, per, 2 * per)] == [0.0, 0.4, 0.1]
    assert t.phases.weights(w, 2 * per).energy_reg == 0.25  # the penalty scales with the term it bounds
    t.state.step = 2 * per
    before = t.state.buffer.data.clone()
    assert "l_px" in t.iteration() and not torch.equal(t.state.buffer.data, before)  # the chains move in the tail
    with pytest.raises(ValueError, match="--px-tail-scale needs --px-stop-epoch"):
        cfg(tmp_path, epochs=3, px_start_epoch=1, px_tail_scale=0.5)
    with pytest.raises(ValueError, match=r"--px-tail-scale must be in \[0, 1\], got 1.5"):
        cfg(tmp_path, epochs=3, px_start_epoch=1, px_stop_epoch=2, px_tail_scale=1.5)


def test_px_fade_epochs_lowers_the_density_to_its_tail_share_linearly(tmp_path):
    from jemtorch.objective import Weights

    t = Trainer(cfg(tmp_path, epochs=4, px_start_epoch=1, px_stop_epoch=2, px_tail_scale=0.2, px_fade_epochs=1.0))
    per, w = t.clock.iters_per_epoch, Weights(1.0, 0.5, 0.0, 1.0, "squared")
    fade = [t.phases.weights(w, 2 * per - 1 + i).px for i in range(per + 2)]
    assert fade[0] == 0.5 and fade[-2] == fade[-1] == pytest.approx(0.1)  # full before the stop, the tail's share after
    assert all(a > b for a, b in zip(fade, fade[1:-1]))  # falling at every step of the fade
    k = per // 2  # k steps into the fade: 1 - (1 - 0.2) k / per of the penalty too
    assert t.phases.weights(w, 2 * per + k - 1).energy_reg == pytest.approx(1 - 0.8 * k / per)
    off = Trainer(cfg(tmp_path / "off", epochs=4, px_start_epoch=1, px_stop_epoch=2, px_fade_epochs=1.0)).phases
    assert [off.generative(s) for s in (2 * per, 3 * per - 2, 3 * per - 1)] == [True, True, False]  # fades out to 0
    with pytest.raises(ValueError, match="--px-fade-epochs needs --px-stop-epoch"):
        cfg(tmp_path, epochs=3, px_fade_epochs=1.0)
    with pytest.raises(ValueError, match="--px-fade-epochs must be >= 0, got -1"):
        cfg(tmp_path, epochs=3, px_stop_epoch=2, px_fade_epochs=-1.0)


def test_px_pause_epochs_trains_the_classifier_alone_then_returns_the_density_at_its_tail_share(tmp_path):
    from jemtorch.objective import Weights

    t = Trainer(cfg(tmp_path, epochs=4, px_start_epoch=1, px_stop_epoch=2, px_tail_scale=0.2, px_pause_epochs=1.0))
    per, w, ph = t.clock.iters_per_epoch, Weights(1.0, 0.5, 0.0, 1.0, "squared"), t.phases
    assert [ph.generative(s) for s in (2 * per - 1, 2 * per, 3 * per - 1, 3 * per)] == [True, False, False, True]
    assert [ph.weights(w, s).px for s in (2 * per - 1, 2 * per, 3 * per - 1, 3 * per, 4 * per - 1)] == \
        [0.5, 0.0, 0.0, pytest.approx(0.1), pytest.approx(0.1)]  # full, paused for an epoch, back at the tail's share
    assert ph.weights(w, 3 * per).energy_reg == pytest.approx(0.2)  # the penalty returns with the term it bounds
    t.state.step = 3 * per
    before = t.state.buffer.data.clone()
    assert "l_px" in t.iteration() and not torch.equal(t.state.buffer.data, before)  # the chains run again
    with pytest.raises(ValueError, match="--px-pause-epochs needs --px-tail-scale > 0"):
        cfg(tmp_path, epochs=4, px_stop_epoch=2, px_pause_epochs=1.0)
    with pytest.raises(ValueError, match="--px-pause-epochs needs --px-tail-scale > 0"):
        cfg(tmp_path, epochs=4, px_stop_epoch=2, px_tail_scale=0.2, px_fade_epochs=0.5, px_pause_epochs=1.0)
    with pytest.raises(ValueError, match="leaves no epoch of the 4 for the density to return in"):
        cfg(tmp_path, epochs=4, px_stop_epoch=2, px_tail_scale=0.2, px_pause_epochs=2.0)
    with pytest.raises(ValueError, match="--px-pause-epochs must be >= 0, got -1"):
        cfg(tmp_path, epochs=4, px_stop_epoch=2, px_tail_scale=0.2, px_pause_epochs=-1.0)


def test_px_tail_std_sets_the_tail_chains_noise_and_the_trained_runs_sampler(tmp_path):
    from jemtorch.build import load_run

    t = Trainer(cfg(tmp_path, epochs=3, px_stop_epoch=2, px_tail_scale=0.5, sgld_std=0.05, px_tail_std=0.0))
    per = t.clock.iters_per_epoch
    assert [t.phases.chain_std(s) for s in (0, 2 * per - 1, 2 * per)] == [0.05, 0.05, 0.0]
    t.iteration()
    assert t.state.sampler.update.noise == 0.05
    t.state.step = 2 * per
    t.iteration()
    assert t.state.sampler.update.noise == 0.0  # the tail's chains run noise-free
    kw = dict(epochs=2, px_stop_epoch=1, px_tail_scale=0.5, sgld_std=0.05, max_iters=2)
    train(cfg(tmp_path / "r", **kw, px_tail_std=0.0))
    run = load_run(tmp_path / "r", "cpu")
    assert run.sampler().update.noise == 0.0  # eval samples as the model last trained
    assert cfg(tmp_path, **kw).final_sgld_std == 0.05  # -1: --sgld-std throughout
    trained = run.cfg.as_trained()
    assert (trained.sgld_std, trained.px_tail_std) == (0.0, -1.0)  # one σ: the tail's
    with pytest.raises(ValueError, match=r"--px-tail-std needs --px-tail-scale > 0"):
        cfg(tmp_path, epochs=3, px_stop_epoch=2, px_tail_std=0.0)
    with pytest.raises(ValueError, match=r"--px-tail-std must be -1 or >= 0, got -0.5"):
        cfg(tmp_path, epochs=3, px_stop_epoch=2, px_tail_scale=0.5, px_tail_std=-0.5)


def test_sgld_step_cap_reaches_the_training_chains_and_is_logged(tmp_path):
    t = Trainer(cfg(tmp_path, sgld_step_cap=1e-6))
    stats = t.iteration()
    assert 0 < float(stats["chain_step"]) < 1.0  # the cap, not --sgld-lr 1, set the step
    assert "chain_step" not in Trainer(cfg(tmp_path / "free")).iteration()
    # --sgld-cap-noise: the short step the cap left takes the noise down with it, so the chains hardly move
    hot = Trainer(cfg(tmp_path / "hot", sgld_step_cap=1e-6, sgld_std=0.05)).iteration()
    cool = Trainer(cfg(tmp_path / "cool", sgld_step_cap=1e-6, sgld_std=0.05, sgld_cap_noise=True)).iteration()
    assert float(cool["travel"]) < 0.25 * float(hot["travel"])
    with pytest.raises(ValueError, match="--sgld-cap-noise needs --sgld-step-cap"):
        cfg(tmp_path, sgld_cap_noise=True)


def test_cd_chains_start_at_the_p_x_batch_before_the_buffers_chains(tmp_path, monkeypatch):
    loop = importlib.import_module("jemtorch.train")  # the package exports train(), the function, by that name

    t = Trainer(cfg(tmp_path, cd_weight=0.5, cd_batch_size=4, cd_steps=3))
    starts, steps, batches = [], [], []
    run_chains, batch = t.state.sampler.run_chains, loop.training_batch

    def spy(jem, x0, y=None, n_steps=None):
        starts.append(x0), steps.append(n_steps)
        return run_chains(jem, x0, y, n_steps)

    monkeypatch.setattr(t.state.sampler, "run_chains", spy)
    monkeypatch.setattr(loop, "training_batch", lambda *a: batches.append(batch(*a)) or batches[-1])
    stats = t.iteration()
    x, _, x_px = batches[0]
    assert "l_cd" in stats and len(starts) == 2  # the chains from the data first, then the buffer's
    px_data = x_px if x_px is not None else x
    assert torch.equal(starts[0], px_data[:4]) and len(starts[1]) == len(px_data)
    assert steps == [3, None]  # --cd-steps for the chains from the data; the buffer's chains keep the run's steps
    assert t.recovery.weights.cd == 0.5
    assert "l_cd" not in Trainer(cfg(tmp_path / "off")).iteration()


def test_gradient_penalty_sees_the_first_images_of_the_p_x_batch(tmp_path, monkeypatch):
    loop = importlib.import_module("jemtorch.train")
    seen, batches, real, batch = [], [], loop.jem_loss, loop.training_batch
    monkeypatch.setattr(loop, "jem_loss", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    monkeypatch.setattr(loop, "training_batch", lambda *a: batches.append(batch(*a)) or batches[-1])
    t = Trainer(cfg(tmp_path, grad_penalty=0.5, grad_penalty_batch=3, p_x_weight=0.5))
    stats = t.iteration()
    x, _, x_px = batches[0]
    assert torch.equal(seen[0]["x_gp"], (x_px if x_px is not None else x)[:3]) and seen[0]["weights"].gp == 0.5
    assert float(stats["l_gp"]) > 0
    assert "l_gp" not in Trainer(cfg(tmp_path / "off")).iteration()
    assert Trainer(cfg(tmp_path / "clf", grad_penalty=0.5, p_x_weight=0)).recovery.weights.gp == 0  # p(x) term only
    with pytest.raises(ValueError, match="--grad-penalty must be >= 0"):
        cfg(tmp_path, grad_penalty=-1)


def test_training_curves_draw_the_trajectory_the_run_kept(tmp_path):
    from jemtorch.figures import final_trajectory, training_curves

    recs = [{"kind": "train", "step": s, "loss": 1.0} for s in (20, 40, 60)]
    recs += [{"kind": "rollback", "step": 40, "diverged_at": 65}, {"kind": "train", "step": 60, "loss": 0.5}]
    kept = final_trajectory(recs, "train")
    assert [(r["step"], r["loss"]) for r in kept] == [(20, 1.0), (40, 1.0), (60, 0.5)]
    assert training_curves(recs, tmp_path / "c.png").is_file() and training_curves([], tmp_path / "d.png") is None


def test_px_ramp_fades_the_generative_terms_in(tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("jemtorch.train")  # the module (jemtorch.train is also a function's name)
    seen = []
    real = train_module.jem_loss
    monkeypatch.setattr(train_module, "jem_loss", lambda *a, **k: (seen.append(k["weights"]), real(*a, **k))[1])
    t = Trainer(cfg(tmp_path, epochs=2, px_start_epoch=1, px_ramp_epochs=4 / 41, energy_reg=0.2, p_x_weight=0.5))
    for _ in range(t.clock.iters_per_epoch + 5):
        t.iteration()
    assert all(w.px == 0 for w in seen[:t.clock.iters_per_epoch])  # epoch 1: classifier steps
    ramp = seen[t.clock.iters_per_epoch:]
    assert [w.px for w in ramp] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])
    assert [w.energy_reg for w in ramp[:4]] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    with pytest.raises(ValueError, match="--px-ramp-epochs must be >= 0"):
        cfg(tmp_path, px_ramp_epochs=-1)


@pytest.mark.parametrize("px_augment", [True, False])
def test_px_data_batches_adds_independent_data_images_to_the_px_term_and_keeps_one_batch_of_chains(tmp_path, px_augment):
    from jemtorch.train import training_batch

    one = Trainer(cfg(tmp_path / "one", epochs=1, px_augment=px_augment))
    three = Trainer(cfg(tmp_path / "three", epochs=1, px_augment=px_augment, px_data_batches=3))
    assert one.extra is None and three.extra.batch_size == 64
    torch.manual_seed(0)
    x, _, x_px = training_batch(three.cfg, three.labeled, None, 5, three.pad, three.flip, three.extra)
    torch.manual_seed(0)
    x1, _, x_px1 = training_batch(one.cfg, one.labeled, None, 5, one.pad, one.flip)
    assert torch.equal(x, x1) and len(x_px) == 3 * len(x)
    assert torch.equal(x_px[:32], x1 if x_px1 is None else x_px1)  # the step's own p(x) images come first
    extra_u8 = three.extra.batch(5)[0]  # then images of the extra stream (un-augmented ones exactly, up to the noise)
    if not px_augment:
        assert (x_px[32:] - extra_u8.float() / 127.5 + 1).abs().max() < 0.3
    seen = {}
    sample = three.state.sampler.sample
    three.state.sampler.sample = lambda jem, n, **kw: (seen.setdefault("n", n), sample(jem, n, **kw))[1]
    assert "l_px" in three.iteration() and seen["n"] == 32  # one chain per labelled image, not per data image
    with pytest.raises(ValueError, match="--px-data-batches must be in 1..64, got 0"):
        cfg(tmp_path, px_data_batches=0)


def test_grad_surgery_steps_with_the_projected_gradient_and_logs_the_conflict(tmp_path):
    from jemtorch.objective import Weights
    from jemtorch.train import forward_backward

    t = Trainer(cfg(tmp_path, epochs=1, grad_surgery=True, norm="none"))  # no batch statistics: x's logits alone
    values = t.iteration()
    assert {"grad_cos", "grad_conflict"} <= set(values) and -1 <= values["grad_cos"] <= 1
    batch = (t.state.buffer.data[:8] * 0 + 0.1, torch.arange(8) % 10, None)  # the step's gradient, taken apart
    torch.manual_seed(0)
    stats, loss_fn = forward_backward(t.state, t.cfg, batch, Weights.from_config(t.cfg), t.autocast)
    got = [p.grad.clone() for p in t.state.jem.parameters()]
    t.state.opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(t.state.jem(batch[0]), batch[1]).backward()
    clf = [p.grad.clone() for p in t.state.jem.parameters()]
    along, cc = (float(sum(v.sum() for v in ts)) for ts in ([a * b for a, b in zip(got, clf)], [a * a for a in clf]))
    if stats["grad_conflict"]:  # the generative part projected off c: what is left along c is c itself
        assert along == pytest.approx(cc, rel=1e-5)
    else:
        assert along >= cc
    with pytest.raises(ValueError, match="--grad-surgery does not combine with --sam-rho"):
        cfg(tmp_path, grad_surgery=True, sam_rho=0.5)
    from jemtorch.distributed import Dist
    with pytest.raises(ValueError, match="--grad-surgery runs in one process only"):
        Trainer(cfg(tmp_path, grad_surgery=True), dist=Dist(rank=0, world_size=2))


def test_logit_shift_tail_trains_the_classifier_as_alone_and_moves_only_the_logits_shift(tmp_path):
    """--px-tail-grad logit-shift: in the tail every weight but the head's gets the cross-entropy's gradient alone, and
    the head's extra gradient is a common shift of the logits (the softmax does not see it)."""
    from jemtorch.energy import logit_head
    from jemtorch.objective import Weights
    from jemtorch.train import forward_backward

    t = Trainer(cfg(tmp_path, epochs=2, px_stop_epoch=1, px_tail_scale=1.0, px_tail_grad="logit-shift", norm="none"))
    x, y = t.state.buffer.data[:8] * 0 + 0.1, torch.arange(8) % 10
    head = logit_head(t.state.jem.f, 10)
    assert head is t.shift_head is t.state.jem.f.head  # the network's logit layer, found when the run is built
    torch.manual_seed(0)
    forward_backward(t.state, t.cfg, (x, y, None), Weights.from_config(t.cfg), t.autocast, shift_head=head)
    got = {n: p.grad.clone() for n, p in t.state.jem.named_parameters()}
    t.state.opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(t.state.jem(x), y).backward()
    clf = {n: p.grad.clone() for n, p in t.state.jem.named_parameters()}
    names = {id(p): n for n, p in t.state.jem.named_parameters()}
    w, b = names[id(head.weight)], names[id(head.bias)]
    for n in got:
        if n not in (w, b):
            torch.testing.assert_close(got[n], clf[n], rtol=1e-5, atol=1e-7)
    dw, db = got[w] - clf[w], got[b] - clf[b]
    assert dw.abs().sum() > 0 and torch.allclose(dw, dw[:1].expand_as(dw)) and torch.allclose(db, db[:1].expand_as(db))
    with torch.no_grad():  # a step along the kept part moves every logit of an image alike: p(y|x) unchanged
        before = t.state.jem(x)
        head.weight -= 10 * dw
        head.bias -= 10 * db
        after = t.state.jem(x)
    torch.testing.assert_close(after.softmax(1), before.softmax(1))
    assert (after - before).abs().max() > 1e-4
    from jemtorch.train import shift_backward
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5))
    params, xs = list(net.parameters()), torch.randn(6, 3)
    for leak in (0.0, 0.5, 1.0):  # --px-tail-leak: ∇clf + leak·∇gen + (1 − leak)·(∇gen's common mode on the head)
        def losses():
            z = net(xs)
            return torch.nn.functional.cross_entropy(z, torch.arange(6) % 5), z.logsumexp(1).mean() + z[:, 0].mean()
        clf, gen = losses()
        c, g = (torch.autograd.grad(v, params, retain_graph=True) for v in (clf, gen))
        common = [g[2].mean(0, keepdim=True).expand_as(g[2]), g[3].mean().expand_as(g[3])]
        want = [cp + leak * gp + (1 - leak) * (common[i - 2] if i >= 2 else 0) for i, (cp, gp) in enumerate(zip(c, g))]
        net.zero_grad(set_to_none=True)
        clf, gen = losses()
        shift_backward(clf, clf + gen, net[2], leak)
        for p, w_ in zip(params, want):
            torch.testing.assert_close(p.grad, w_)
    with pytest.raises(ValueError, match="--px-tail-leak needs --px-tail-grad logit-shift"):
        cfg(tmp_path, px_stop_epoch=1, px_tail_scale=0.5, px_tail_leak=0.1)
    with pytest.raises(ValueError, match="--px-tail-grad logit-shift needs --px-tail-scale > 0"):
        cfg(tmp_path, px_tail_grad="logit-shift")
    with pytest.raises(ValueError, match="--px-tail-grad must be all or logit-shift"):
        cfg(tmp_path, px_tail_grad="head")
    with pytest.raises(ValueError, match="use one"):
        cfg(tmp_path, px_stop_epoch=1, px_tail_scale=0.5, px_tail_grad="logit-shift", grad_surgery=True)
    from jemtorch.distributed import Dist
    with pytest.raises(ValueError, match="--px-tail-grad logit-shift runs in one process only"):
        Trainer(cfg(tmp_path, px_stop_epoch=1, px_tail_scale=0.5, px_tail_grad="logit-shift"),
                dist=Dist(rank=0, world_size=2))
    with pytest.raises(ValueError, match="does not end in an nn.Linear layer"):
        logit_head(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), 10)


def test_a_baseline_never_reads_the_generative_settings(tmp_path):
    """config.GENERATIVE_ONLY: quality.py reuses a baseline across them, so they must not change its weights."""
    from jemtorch.config import GENERATIVE_ONLY, training_differences

    other = dict(px_start_epoch=1, px_ramp_epochs=0.5, energy_reg=0.3, energy_reg_form="batch-mean", sgld_steps=5,
                 sgld_steps_max=8, sgld_lr=3.0, sgld_std=0.1, sgld_clamp=True, sgld_update="clamped", pyld_inner_steps=2,
                 pyld_lr=0.5, pyld_eps=0.5, px_target_reach=0.3, px_scale_min=0.5, px_stop_epoch=2, px_tail_scale=0.5, px_tail_std=0.0,
                 px_fade_epochs=0.5, sgld_step_cap=0.05, sgld_cap_noise=True, cd_weight=0.5, cd_batch_size=2, cd_steps=3, reinit_freq=0.5,
                 grad_penalty=0.5, grad_penalty_batch=2, grad_surgery=True, px_data_batches=2)
    pause = dict(px_stop_epoch=1, px_tail_scale=0.5, px_pause_epochs=0.5,  # a pause rules out a fade: a run of its own
                 px_tail_grad="logit-shift", px_tail_leak=0.5)
    assert set(other) | set(pause) == set(GENERATIVE_ONLY)
    weights, configs = [], []
    for name, kw in (("a", {}), ("b", other), ("c", pause)):  # one after the other: augmentation draws from the global RNG
        t = Trainer(cfg(tmp_path / name, p_x_weight=0, epochs=2, **kw))
        for _ in range(6):
            t.iteration()
        weights.append(t.state.jem.state_dict())
        configs.append(t.cfg.to_dict())
    for changed in weights[1:]:
        for k, v in weights[0].items():
            assert torch.equal(v, changed[k]), k
    da, db, dc = configs
    assert training_differences(da, db) == [] == training_differences(da, dc)
    on = {"p_x_weight": 1.0}
    seen = {*training_differences({**da, **on}, {**db, **on}), *training_differences({**da, **on}, {**dc, **on})}
    assert sorted(seen) == sorted(GENERATIVE_ONLY)
    assert training_differences(da, {**da, "lr": 0.5, "out": "elsewhere"}) == ["lr"]
    here = {**da, "data_root": "data"}  # one folder spelt two ways, then another folder
    assert training_differences(here, {**da, "data_root": str(Path("data").resolve())}) == []
    assert training_differences(here, {**da, "data_root": "other"}) == ["data_root"]
    older = {k: v for k, v in da.items() if k != "time_limit"}  # saved before --time-limit existed: its default
    assert training_differences(older, da) == [] and training_differences(older, {**da, "time_limit": 9.0}) != []


def test_training_never_reads_the_sampling_settings(tmp_path):
    """config.SAMPLING_ONLY (--sample-step-cap): a JEM trains to the same weights whatever their values, so
    quality.py reuses a trained JEM across them."""
    from jemtorch.config import SAMPLING_ONLY, training_differences

    weights, configs = [], []
    for name, kw in (("a", {}), ("b", {"sample_step_cap": 0.5})):
        torch.manual_seed(0)
        t = Trainer(cfg(tmp_path / name, p_x_weight=1.0, sgld_steps=2, epochs=2, **kw))
        for _ in range(4):
            t.iteration()
        weights.append(t.state.jem.state_dict())
        configs.append(t.cfg.to_dict())
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k
    assert SAMPLING_ONLY == ("sample_step_cap",) and training_differences(*configs) == []


def test_ema_decay_validates_and_saves_the_weights_average_and_a_resume_continues_it(tmp_path):
    t = Trainer(cfg(tmp_path / "a", epochs=1, p_x_weight=0.0, ema_decay=0.9))
    average = {k: v.clone() for k, v in t.state.jem.f.state_dict().items()}  # the run's first weights
    t.start()
    while t.state.step < t.clock.total_iters:  # the average by hand after every step, as the callback keeps it
        t.iteration()
        average = {k: 0.9 * average[k] + 0.1 * v if v.is_floating_point() else v.clone()
                   for k, v in t.state.jem.f.state_dict().items()}
        t.call("on_step_end", {})
    t.log.close()
    t.bar.close()
    best, ckpt = load_safe(tmp_path / "a/best.pt"), load_safe(tmp_path / "a/checkpoint.pt")
    assert best["step"] == t.clock.total_iters
    for k, v in average.items():
        assert torch.allclose(best["model"][k], v, atol=1e-6), k
        assert torch.equal(ckpt["callbacks"]["WeightAverage"]["average"][k], best["model"][k]), k
    assert any(not torch.equal(ckpt["model"][k], best["model"][k]) for k in average)  # the live weights kept apart
    # two epochs in one go, and in two parts (a pause mid-epoch, then --resume), keep the same average
    ema = dict(p_x_weight=0.0, ema_decay=0.9, epochs=2)
    full = train(cfg(tmp_path / "b", **ema))
    train(cfg(tmp_path / "c", **ema, max_iters=50))
    resumed = Trainer(cfg(tmp_path / "c", **ema))
    resumed.resume()
    assert resumed.fit()["test_accuracy"] == full["test_accuracy"]
    b, c = (load_safe(tmp_path / r / "best.pt")["model"] for r in ("b", "c"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    with pytest.raises(ValueError, match="--ema-decay needs a validation split"):
        cfg(tmp_path / "d", ema_decay=0.9, n_valid=0)
    with pytest.raises(ValueError, match="--ema-decay must be in"):
        cfg(tmp_path / "d", ema_decay=1.0)
