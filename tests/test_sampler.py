
import pytest
import torch

from jemtorch import JEM, JEMSampler, ReplayBuffer, create_model, sgld


def test_sgld_samples_a_gaussian():
    """Langevin dynamics (step = σ²/2) on log N(μ, s²) converges to that Gaussian's mean and variance."""
    torch.manual_seed(0)
    mu, s = 1.5, 0.7
    noise = 0.05
    step = noise**2 / 2
    x0 = torch.rand(4000, 1) * 2 - 1
    x = sgld(lambda x: (-(x - mu) ** 2 / (2 * s**2)).sum(1), x0, n_steps=6000, step_size=step, noise=noise)
    assert abs(x.mean().item() - mu) < 0.05
    assert abs(x.var().item() - s**2) / s**2 < 0.08


def test_sgld_zero_noise_is_gradient_ascent():
    x = sgld(lambda x: -(x**2).sum(1), torch.ones(3, 2), n_steps=1, step_size=0.25, noise=0.0)
    torch.testing.assert_close(x, torch.full((3, 2), 0.5))  # x + 0.25 * (-2x)


def test_sgld_step_cap_holds_the_move_on_a_steep_energy_and_leaves_a_flat_one_alone():
    steep = lambda x: -50 * (x**2).sum(1)  # ∇ = −100·x: a step of size 1 from x = 1 moves by 100
    x0, record = torch.ones(4, 3), {}
    capped = sgld(steep, x0, n_steps=1, step_size=1.0, noise=0.0, step_cap=0.05, record=record)
    assert (capped - x0).pow(2).mean().sqrt().item() == pytest.approx(0.05)
    assert record["step"].item() == pytest.approx(0.05 / 100)
    sgld(steep, x0, n_steps=1, step_size=1.0, noise=0.0, grad_clip=1.0, record=record)
    assert record["grad_norm"].item() == pytest.approx(100 * 3**0.5)  # recorded before the clip, as logged
    flat = lambda x: -0.005 * (x**2).sum(1)  # ∇ = −0.01·x: below the cap, the step is the step size
    torch.testing.assert_close(sgld(flat, x0, 3, 1.0, 0.0, step_cap=0.05), sgld(flat, x0, 3, 1.0, 0.0), rtol=0, atol=0)


def test_sgld_cap_noise_keeps_the_chains_temperature_where_the_cap_binds():
    """Langevin (step = σ²/2) on a Gaussian steep enough that the cap shortens every step: with --sgld-cap-noise the
    noise shrinks with the step and the chains still sample the Gaussian; without, the shortened step with the full
    noise heats them (variance ≈ s² · step size / capped step)."""
    torch.manual_seed(0)
    s, noise = 0.1, 0.05
    step = noise**2 / 2  # at x ~ s the move step·x/s² is ~0.0125 RMS: a cap of 0.005 lowers it ~2.5×
    log_p = lambda x: (-(x**2) / (2 * s**2)).sum(1)
    x0 = torch.randn(4000, 1) * s
    tempered = sgld(log_p, x0, 3000, step, noise, step_cap=0.005, cap_noise=True)
    hot = sgld(log_p, x0, 3000, step, noise, step_cap=0.005)
    assert abs(tempered.var().item() - s**2) / s**2 < 0.1
    assert hot.var().item() > 1.5 * s**2


def test_buffer_reinit_frequency():
    torch.manual_seed(0)
    buf = ReplayBuffer(1000, (1, 2, 2), reinit_freq=0.2)
    buf.data.fill_(5.0)  # anything not from U(-1, 1) marks a buffer draw
    total, fresh = 0, 0
    for _ in range(50):
        x0, _ = buf.sample(200)
        fresh += (x0.abs() <= 1).all(dim=(1, 2, 3)).sum().item()
        total += 200
    assert abs(fresh / total - 0.2) < 0.02
    assert ReplayBuffer(10, (1,), reinit_freq=0.0).sample(10)[0].abs().max() <= 1  # initial buffer is U(-1, 1)


def test_class_conditional_buffer_draws_from_class_slices():
    buf = ReplayBuffer(100, (1,), num_classes=10, reinit_freq=0.0, class_conditional=True)
    buf.data = torch.arange(100, dtype=torch.float).view(100, 1)
    y = torch.tensor([0, 3, 9] * 20)
    x0, idx = buf.sample(len(y), y)
    assert torch.equal(idx // 10, y)
    assert torch.equal(x0.view(-1).long() // 10, y)


def test_jem_sampler_freezes_parameters_and_updates_buffer():
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    jem.train()
    buf = ReplayBuffer(20, (1, 8, 8), num_classes=3, reinit_freq=0.0)
    before = buf.data.clone()
    sampler = JEMSampler(buf, step_size=1.0, noise=0.01, n_steps=3)
    x = sampler.sample(jem, 5)
    assert x.shape == (5, 1, 8, 8) and not x.requires_grad
    assert all(p.grad is None and p.requires_grad for p in jem.parameters())
    assert jem.training
    assert (buf.data != before).any(dim=(1, 2, 3)).sum() >= 1


def test_sgld_increases_log_px():
    torch.manual_seed(0)
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    x = sgld(jem.log_px, x0, n_steps=10, step_size=1.0, noise=0.0)
    assert jem.log_px(x).mean() > jem.log_px(x0).mean()


@pytest.mark.parametrize("kw", [{"size": 0}, {"reinit_freq": 1.5}])
def test_buffer_bad_arguments(kw):
    args = {"size": 10, "shape": (1,), "reinit_freq": 0.05, **kw}
    with pytest.raises(ValueError):
        ReplayBuffer(**args)


def test_sgld_clamp_keeps_chains_in_the_image_range():
    x0 = torch.zeros(8, 4)
    free = sgld(lambda x: (5 * x).sum(1), x0, n_steps=5, step_size=1.0, noise=0.0)
    assert free.max() == pytest.approx(25.0)  # the gradient pushes far outside [-1, 1]
    held = sgld(lambda x: (5 * x).sum(1), x0, n_steps=5, step_size=1.0, noise=0.1, clamp=(-1.0, 1.0))
    assert held.min() >= -1 and held.max() <= 1
    buf = ReplayBuffer(50, (4,), reinit_freq=0.0)
    jem_like = JEM(torch.nn.Linear(4, 2))
    with torch.no_grad():
        jem_like.f.weight.fill_(10.0)
    x = JEMSampler(buf, step_size=1.0, noise=0.01, n_steps=3, clamp=True).sample(jem_like, 10)
    assert x.abs().max() <= 1


def test_gaussians_fit_recovers_class_statistics():
    from jemtorch.sampler import Gaussians

    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-0.5, 0.2], [0.4, -0.3]])
    y = torch.arange(2).repeat_interleave(4000)
    x = (means[y] + 0.1 * torch.randn(8000, 2, generator=g)).view(8000, 2, 1, 1)
    gm = Gaussians.fit(x, y, num_classes=2)
    torch.testing.assert_close(gm.mean, means, atol=0.01, rtol=0)
    draws = gm.sample(4000, torch.ones(4000, dtype=torch.long))
    assert draws.shape == (4000, 2, 1, 1)
    torch.testing.assert_close(draws.flatten(1).mean(0), means[1], atol=0.01, rtol=0)
    assert abs(draws.flatten(1).std(0).mean().item() - 0.1) < 0.01  # 0.1² + 1e-4 jitter
    single = Gaussians.fit(x, None, num_classes=2)
    assert single.num_classes == 1 and single.sample(5).shape == (5, 2, 1, 1)


def test_gaussians_block_average_large_images():
    from jemtorch.sampler import Gaussians

    x = torch.rand(50, 1, 64, 64) * 2 - 1
    gm = Gaussians.fit(x, None, num_classes=1, max_side=32)
    assert gm.block == 2 and gm.chol.shape == (1, 1024, 1024)
    s = gm.sample(3)
    assert s.shape == (3, 1, 64, 64) and s.abs().max() <= 1
    torch.testing.assert_close(s[:, :, ::2, ::2], s[:, :, 1::2, 1::2])  # upsampled by repetition


def test_buffer_starts_with_equal_class_slices_from_the_class_gaussians():
    from jemtorch.sampler import Gaussians

    gm = Gaussians(torch.tensor([[-0.9], [0.9]]), torch.full((2, 1, 1), 1e-3), (1, 1, 1))
    buf = ReplayBuffer(10, (1, 1, 1), num_classes=2, reinit_freq=1.0, class_conditional=True, init=gm)
    assert (buf.data[:5] < 0).all() and (buf.data[5:] > 0).all()
    x0, idx = buf.sample(6, torch.tensor([1, 1, 1, 0, 0, 0]))  # reinit draws from the slot's own class
    assert (x0[:3] > 0).all() and (x0[3:] < 0).all()
    buf.data.fill_(0.0)
    assert buf.refresh(0.5) == 5 and (buf.data != 0).sum() == 5


def test_clamped_update_is_sadajem_step():
    from jemtorch.sampler import ClampedGradient

    x0 = torch.tensor([[0.0, 0.5]])
    # log density 3·x0 − 0.1·x1: gradient (3, −0.1) is clipped to (1, −0.1); the result is clipped to [−1, 1]
    x = ClampedGradient(step_size=1.0).run(None, lambda x: (x * torch.tensor([3.0, -0.1])).sum(1), x0, n_steps=2)
    torch.testing.assert_close(x, torch.tensor([[1.0, 0.3]]))


def test_pyld_raises_log_px_and_stays_in_range():
    from jemtorch.sampler import PYLD, first_layer

    torch.manual_seed(0)
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    assert isinstance(first_layer(jem), torch.nn.Conv2d)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    x = PYLD(step_size=0.1, inner_steps=3, inner_lr=0.05).run(jem, jem.log_px, x0, n_steps=4)
    assert x.abs().max() <= 1 and jem.log_px(x).mean() > jem.log_px(x0).mean()
    assert not any(p.grad is not None for p in jem.parameters())


def test_pyld_outer_step_is_the_full_gradient_step():
    """Without inner steps, one PYLD step is x + α∇ₓ log p(x): the gradient it rebuilds as Jᵀp through the first
    layer (whose output it feeds in as a leaf) is the true input gradient."""
    from jemtorch.sampler import PYLD

    torch.manual_seed(0)
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    x0 = (torch.rand(8, 1, 8, 8) * 2 - 1).requires_grad_(True)
    (g,) = torch.autograd.grad(jem.log_px(x0).sum(), x0)
    x = PYLD(step_size=0.1, inner_steps=0).run(jem, jem.log_px, x0.detach(), n_steps=1)
    torch.testing.assert_close(x, (x0.detach() + 0.1 * g).clamp(-1, 1))


def test_pyld_works_on_a_compiled_network():
    """torch.compile hides intermediate tensors; PYLD must still get p = ∂ log p/∂z and the same chains."""
    from jemtorch.sampler import PYLD

    torch.manual_seed(0)
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3))
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    eager = PYLD(step_size=0.5, inner_steps=2).run(jem, jem.log_px, x0, n_steps=2)
    jem.f.compile(backend="aot_eager")  # AOTAutograd hides the intermediates as Inductor does, without its codegen
    compiled = PYLD(step_size=0.5, inner_steps=2).run(jem, jem.log_px, x0, n_steps=2)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_train_mode_sampling_leaves_batchnorm_statistics_alone():
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3, norm="batch"))
    before = {k: v.clone() for k, v in jem.state_dict().items()}
    sampler = JEMSampler(ReplayBuffer(20, (1, 8, 8), num_classes=3), n_steps=2, model_mode="train")
    sampler.sample(jem, 8)
    assert all(torch.equal(v, before[k]) for k, v in jem.state_dict().items() if "num_batches" not in k)
    assert sampler.grad_norm is not None and sampler.grad_norm > 0


def test_semi_supervised_init_uses_only_the_kept_labels():
    from jemtorch import make_config
    from jemtorch.build import init_images
    from jemtorch.data import load_dataset

    data = load_dataset("digits")
    x, y = init_images(make_config(labels_per_class=5), data)
    assert len(y) == 50 and torch.equal(torch.bincount(y), torch.full((10,), 5))
    assert len(init_images(make_config(), data)[1]) == len(data.y_train)
