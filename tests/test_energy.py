import torch
from torch import nn

from jemtorch import JEM, create_model


class Linear(nn.Module):
    def __init__(self, logits_bias=0.0):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.shift = logits_bias

    def forward(self, x):
        return self.lin(x.flatten(1)) + self.shift


def test_softmax_and_energies_from_logits():
    jem = JEM(Linear())
    x = torch.randn(5, 1, 2, 2)
    logits = jem(x)
    torch.testing.assert_close(jem.log_p_y_given_x(x).exp(), logits.softmax(1))
    torch.testing.assert_close(jem.energy(x), -torch.log(logits.exp().sum(1)))
    y = torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(jem.energy(x, y), -logits[torch.arange(5), y])
    # log p(y|x) = log p(x, y) - log p(x)
    torch.testing.assert_close(jem.log_pxy(x, y) - jem.log_px(x), jem.log_p_y_given_x(x)[torch.arange(5), y])


def test_shifting_logits_changes_px_not_pyx():
    torch.manual_seed(0)
    a = Linear()
    b = Linear(logits_bias=3.0)
    b.lin.load_state_dict(a.lin.state_dict())
    ja, jb = JEM(a), JEM(b)
    x = torch.randn(7, 1, 2, 2)
    torch.testing.assert_close(ja.log_p_y_given_x(x), jb.log_p_y_given_x(x))
    torch.testing.assert_close(jb.log_px(x) - ja.log_px(x), torch.full((7,), 3.0))
    assert not torch.allclose(ja.energy(x), jb.energy(x))


def test_precomputed_logits_match_images():
    jem = JEM(create_model("cnn-8", in_channels=1, num_classes=10))
    x = torch.randn(3, 1, 8, 8)
    logits = jem(x)
    torch.testing.assert_close(jem.log_px(logits=logits), jem.log_px(x))


def test_nonfinite_weights_names_nan_and_inf_in_weights_and_buffers():
    from jemtorch.energy import nonfinite_weights

    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert nonfinite_weights(net) == []
    with torch.no_grad():
        net[0].bias[1] = float("nan")
        net[1].running_var[0] = float("inf")
    assert nonfinite_weights(net) == ["0.bias", "1.running_var"]  # num_batches_tracked (an integer) never counts
