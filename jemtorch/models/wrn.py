"""Wide-ResNet (Zagoruyko & Komodakis 2016) as used by JEM: ``wrn-<depth>-<width>``, e.g. the paper's wrn-28-10.

Follows the official JEM code (wideresnet.py): pre-activation basic blocks, LeakyReLU(0.2), no normalisation by
default (``norm`` = None | "batch" | "instance" | "layer"), optional dropout, global average pooling, linear head.
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
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float, norm: Optional[str], leak: float):
        super().__init__()
        self.bn1 = make_norm(norm, c_in)
        self.act1 = nn.LeakyReLU(leak)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True)
        self.bn2 = make_norm(norm, c_out)
        self.act2 = nn.LeakyReLU(leak)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=True)
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
                layers.append(BasicBlock(c_in, widths[stage], stride if i == 0 else 1, dropout, norm, leak))
                c_in = widths[stage]
        self.blocks = nn.Sequential(*layers)
        self.bn = make_norm(norm, c_in)
        self.act = nn.LeakyReLU(leak)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.blocks(self.conv1(x))))
        return self.head(self.pool(h).flatten(1))


@register("wrn")
def _wrn(spec: str, *, in_channels: int, num_classes: int, dropout: float = 0.0, norm=None, **_) -> nn.Module:
    try:
        depth, widen = (int(v) for v in spec.split("-"))
    except ValueError:
        raise ValueError(f"Wide-ResNet names are wrn-<depth>-<width>, e.g. wrn-28-10; got 'wrn-{spec}'") from None
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from none, batch, instance, layer")
    return WideResNet(depth, widen, in_channels, num_classes, dropout=dropout, norm=norm)
