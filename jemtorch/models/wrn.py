"""Wide-ResNet (Zagoruyko & Komodakis 2016) as used by JEM: ``wrn-<depth>-<width>``, e.g. the paper's wrn-28-10.

``wrn-D-W`` is the official JEM network (wgrathwohl/JEM wideresnet.py, which JEM++ and SADA-JEM build on):
pre-activation basic blocks whose *second* convolution carries the stage's stride, LeakyReLU(0.2), no normalisation
by default (``norm`` = None | "batch" | "instance" | "layer"), optional dropout, global average pooling, linear head.
Multiply-adds per 32×32 image: 72.8 M (wrn-10-2), 242.7 M (wrn-28-2), 5 951 M (wrn-28-10) (tests/test_models.py).

``wrn-firststride-D-W`` puts the stride on the first convolution instead (what jemtorch 0.1 called ``wrn-D-W``):
the same parameters, less work per image (44.5 M, 214.4 M, 5 243 M multiply-adds), not the paper's network. Runs and
exports written by jemtorch 0.1 with a ``wrn-D-W`` model are read back as this variant.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .registry import register

NORMS = (None, "none", "batch", "instance", "layer")


def make_norm(kind: Optional[str], channels: int, momentum: float = 0.9) -> nn.Module:
    """``momentum=0.9`` is the official JEM wideresnet.py value (PyTorch convention: the new batch weighs 0.9)."""
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=momentum)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown norm {kind!r}; choose from none, batch, instance, layer")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float, norm: Optional[str], leak: float,
                 stride_first: bool = False):
        super().__init__()
        self.bn1 = make_norm(norm, c_in)
        self.act1 = nn.LeakyReLU(leak)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride if stride_first else 1, padding=1, bias=True)
        self.bn2 = make_norm(norm, c_out)
        self.act2 = nn.LeakyReLU(leak)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1 if stride_first else stride, padding=1, bias=True)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=True) if (stride != 1 or c_in != c_out) else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.act1(self.bn1(x))))
        out = self.conv2(self.act2(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widen: int,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.0,
        norm: Optional[str] = None,
        leak: float = 0.2,
        stride_first: bool = False,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"Wide-ResNet depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        layers = []
        c_in = widths[0]
        for stage, stride in zip(range(1, 4), (1, 2, 2)):
            for i in range(n):
                layers.append(BasicBlock(c_in, widths[stage], stride if i == 0 else 1, dropout, norm, leak, stride_first))
                c_in = widths[stage]
        self.blocks = nn.Sequential(*layers)
        self.bn = make_norm(norm, c_in)
        self.act = nn.LeakyReLU(leak)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.blocks(self.conv1(x))))
        return self.head(self.pool(h).flatten(1))


def _build(prefix: str, spec: str, in_channels: int, num_classes: int, dropout: float, norm, stride_first: bool):
    try:
        depth, widen = (int(v) for v in spec.split("-"))
    except ValueError:
        raise ValueError(f"Wide-ResNet names are {prefix}-<depth>-<width>, e.g. {prefix}-28-10; got "
                         f"'{prefix}-{spec}'") from None
    if not (10 <= depth <= 1000 and 1 <= widen <= 64):
        raise ValueError(f"{prefix}-{spec}: depth must be in 10..1000 and width in 1..64")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from none, batch, instance, layer")
    return WideResNet(depth, widen, in_channels, num_classes, dropout=dropout, norm=norm, stride_first=stride_first)


@register("wrn")
def _wrn(spec: str, *, in_channels: int, num_classes: int, dropout: float = 0.0, norm=None, **_) -> nn.Module:
    return _build("wrn", spec, in_channels, num_classes, dropout, norm, stride_first=False)


@register("wrn-firststride")
def _wrn_first_stride(spec: str, *, in_channels: int, num_classes: int, dropout: float = 0.0, norm=None,
                      **_) -> nn.Module:
    return _build("wrn-firststride", spec, in_channels, num_classes, dropout, norm, stride_first=True)


def model_as_written(model: str, jemtorch_version: Optional[str]) -> str:
    """The architecture a run or export was trained with: ``wrn-D-W`` written by jemtorch 0.1 (no version recorded,
    or "0.1.x") was the first-stride variant."""
    legacy = jemtorch_version is None or jemtorch_version.startswith("0.1")
    if legacy and model.startswith("wrn-") and not model.startswith("wrn-firststride-"):
        return "wrn-firststride-" + model[len("wrn-"):]
    return model
