import pytest
import torch

from jemtorch.models import create_model


@pytest.mark.parametrize("name,size,ch", [("cnn", 8, 1), ("cnn-16", 28, 1), ("cnn-silu-8", 28, 1),
                                             ("wrn-10-1", 32, 3), ("wrn-16-2", 28, 1)])
def test_models_by_name_give_logits(name, size, ch):
    m = create_model(name, in_channels=ch, num_classes=7)
    assert m(torch.randn(2, ch, size, size)).shape == (2, 7)


@pytest.mark.parametrize("norm", ["batch", "instance", "layer", None])
def test_wrn_norm_options(norm):
    m = create_model("wrn-10-1", in_channels=3, num_classes=10, norm=norm, dropout=0.1)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    has_bn = any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    assert has_bn == (norm == "batch")


def multiply_adds(model: torch.nn.Module, shape=(3, 32, 32)) -> int:
    """Multiply-adds of one image through every Conv2d and Linear layer (forward hooks)."""
    total = 0

    def count(m, inputs, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return total


def test_wrn28_10_is_the_papers_network():
    """wrn-D-W is the official JEM wideresnet.py (stride on each block's second convolution): its multiply-adds per
    32×32 image; the first-stride variant has the same parameters and less work."""
    m = create_model("wrn-28-10", in_channels=3, num_classes=10)
    n = sum(p.numel() for p in m.parameters())
    assert 36e6 < n < 37e6  # 36.5M parameters, as the standard WRN-28-10
    assert round(multiply_adds(m) / 1e6) == 5951
    assert [round(multiply_adds(create_model(f"wrn-{s}", in_channels=3, num_classes=10)) / 1e5) / 10
            for s in ("10-2", "28-2")] == [72.8, 242.7]
    cheap = create_model("wrn-firststride-28-10", in_channels=3, num_classes=10)
    assert sum(p.numel() for p in cheap.parameters()) == n and round(multiply_adds(cheap) / 1e6) == 5243
    assert [b.conv2.stride for b in m.blocks] == [(1, 1)] * 4 + [(2, 2)] + [(1, 1)] * 3 + [(2, 2)] + [(1, 1)] * 3


def test_runs_of_jemtorch_01_keep_their_network():
    from jemtorch.models.wrn import model_as_written

    assert model_as_written("wrn-28-10", None) == model_as_written("wrn-28-10", "0.1.0") == "wrn-firststride-28-10"
    assert model_as_written("wrn-28-10", "0.2.0") == "wrn-28-10" and model_as_written("cnn-16", None) == "cnn-16"


@pytest.mark.parametrize("bad", ["resnet", "wrn-27-10", "wrn-x", "cnn-abc", "cnn-silu-x", "wrn-28-1000", "wrn-firststride-2"])
def test_bad_model_names(bad):
    with pytest.raises(ValueError):
        create_model(bad, in_channels=1, num_classes=10)


def test_cnn_silu_is_the_cnn_with_a_smooth_activation():
    """Same layers and parameter count as cnn-<w>; only the nonlinearity differs (and so the energy is smooth)."""
    leaky, smooth = (create_model(n, in_channels=1, num_classes=10) for n in ("cnn-8", "cnn-silu-8"))
    assert [p.shape for p in leaky.parameters()] == [p.shape for p in smooth.parameters()]
    assert any(isinstance(m, torch.nn.SiLU) for m in smooth.modules())
    assert not any(isinstance(m, torch.nn.SiLU) for m in leaky.modules())
