"""A small all-convolutional classifier that makes CPU JEM runs practical (digits, MNIST, CIFAR at low budget).

Three stages of two 3×3 convolutions (widths w, 2w, 4w; stride-2 between stages), LeakyReLU(0.2) as in the
official JEM code, no normalisation (batch-norm statistics would differ between data and SGLD samples), average
pooling to a 4×4 map (keeps coarse layout: on Fashion-MNIST it learns markedly faster than global pooling) and a
linear head. Works for any input size ≥ 4×4.
"""
from __future__ import annotations

from torch import nn

from .registry import register


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), _act(),
            nn.Conv2d(w, w, 3, padding=1), _act(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _act(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), _act(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), _act(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), _act(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(4 * w * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@register("cnn")
def _cnn(spec: str, *, in_channels: int, num_classes: int, dropout: float = 0.0, norm=None, **_) -> nn.Module:
    if norm not in (None, "none"):
        raise ValueError("the small cnn has no normalisation option; use a wrn model for --norm")
    width = int(spec) if spec else 32
    return SmallCNN(in_channels, num_classes, width=width, dropout=dropout)
