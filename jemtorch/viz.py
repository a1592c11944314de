"""Image grids as PNG, upscaled (nearest neighbour) so that 8×8 and 28×28 images are visible to a person."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import to_uint8


def make_grid(x: torch.Tensor, nrow: Optional[int] = None, pad: int = 2, min_tile: int = 48) -> np.ndarray:
    """x: (B, C, H, W) floats in [-1, 1] → uint8 image (H', W', 3) with ``nrow`` images per row."""
    x = to_uint8(x.detach().float().cpu())
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    b, _, h, w = x.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol_rows = math.ceil(b / nrow)
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = x.permute(0, 2, 3, 1).numpy()
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    return grid


def save_grid(x: torch.Tensor, path: str | Path, nrow: Optional[int] = None, min_tile: int = 48) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(x, nrow=nrow, min_tile=min_tile)).save(path)
    return path
