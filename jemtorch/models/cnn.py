"""A small all-convolutional classifier that makes CPU JEM runs practical (digits, MNIST, CIFAR at low budget).

Three stages of two 3×3 convolutions (widths w, 2w, 4w; stride-2 between stages), LeakyReLU(0.2) as in the
official JEM code (``cnn-silu-<width>``: SiLU/Swish instead, a smooth energy), average pooling to a 4×4 map (keeps
coarse layout: on Fashion-MNIST it learns markedly faster than global pooling) and a linear head. Works for any input
size ≥ 4×4.

Normalisation (``norm``): none by default (the paper's choice: batch statistics would differ between data and
samples); ``batch`` puts BatchNorm after every convolution, as the JEM++/SADA-JEM networks — train it with
``--separate-forward`` so data and samples never share batch statistics (the jempp/sadajem recipes set it).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .registry import register
from .wrn import NORMS, make_norm

ACTIVATIONS = {
    "leaky": lambda: nn.LeakyReLU(0.2),  # the official JEM code's
    # smooth (Swish = SiLU, as in EBM networks: wgrathwohl/LSD networks.py): on Fashion-MNIST its density detects
    # MNIST best and its long chains drift further (docs/results/density.md, "A smooth network")
    "silu": nn.SiLU,
}


def _conv(c_in: int, c_out: int, stride: int, norm: Optional[str], act: str) -> list[nn.Module]:
    plain = norm in (None, "none")
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=plain), make_norm(norm, c_out, momentum=0.1),
            ACTIVATIONS[act]()]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0,
                 norm: Optional[str] = None, act: str = "leaky"):
        super().__init__()
        w = width
        layers = []
        for c_in, c_out, stride in ((in_channels, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1),
                                    (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)):
            layers += _conv(c_in, c_out, stride, norm, act)
        self.features = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)],
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(4 * w * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@register("cnn")
def _cnn(spec: str, *, in_channels: int, num_classes: int, dropout: float = 0.0, norm=None, **_) -> nn.Module:
    return _build("cnn", spec, in_channels, num_classes, dropout, norm, act="leaky")


@register("cnn-silu")
def _cnn_silu(spec: str, *, in_channels: int, num_classes: int, dropout: float = 0.0, norm=None, **_) -> nn.Module:
    return _build("cnn-silu", spec, in_channels, num_classes, dropout, norm, act="silu")


def _build(prefix: str, spec: str, in_channels: int, num_classes: int, dropout: float, norm, act: str) -> nn.Module:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from none, batch, instance, layer")
    try:
        width = int(spec) if spec else 32
    except ValueError:
        raise ValueError(f"{prefix} names are {prefix} or {prefix}-<width>, e.g. {prefix}-16; got '{prefix}-{spec}'") from None
    if not 1 <= width <= 1024:
        raise ValueError(f"{prefix}-{spec}: the width must be in 1..1024")
    return SmallCNN(in_channels, num_classes, width=width, dropout=dropout, norm=norm, act=act)
