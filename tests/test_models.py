import pytest
import torch

from jemtorch.models import create_model


@pytest.mark.parametrize("name,size,ch", [("cnn", 8, 1), ("cnn-16", 28, 1), ("wrn-10-1", 32, 3), ("wrn-16-2", 28, 1)])
def test_models_by_name_give_logits(name, size, ch):
    m = create_model(name, in_channels=ch, num_classes=7)
    assert m(torch.randn(2, ch, size, size)).shape == (2, 7)


@pytest.mark.parametrize("norm", ["batch", "instance", "layer", None])
def test_wrn_norm_options(norm):
    m = create_model("wrn-10-1", in_channels=3, num_classes=10, norm=norm, dropout=0.1)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    has_bn = any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    assert has_bn == (norm == "batch")


def test_wrn28_10_is_the_papers_size():
    m = create_model("wrn-28-10", in_channels=3, num_classes=10)
    n = sum(p.numel() for p in m.parameters())
    assert 36e6 < n < 37e6  # 36.5M parameters, as the standard WRN-28-10


@pytest.mark.parametrize("bad", ["resnet", "wrn-27-10", "wrn-x", "cnn-abc"])
def test_bad_model_names(bad):
    with pytest.raises(ValueError):
        create_model(bad, in_channels=1, num_classes=10)
