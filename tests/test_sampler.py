
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
