"""PNG output without torchvision: image grids (PIL) and 2-D scatter plots (matplotlib, Agg)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from fastonestep.engine.checkpoint import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (H', W', C) uint8 canvas, nrow images per row."""
    imgs = to_uint8(images)
    n, h, w, c = imgs.shape
    nrows = math.ceil(n / nrow)
    canvas = np.zeros((nrows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y:y + h, x:x + w] = imgs[i]
    return canvas


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8, pad: int = 2) -> None:
    canvas = image_grid(images, nrow, pad)
    img = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_scatter(points: torch.Tensor, reference: torch.Tensor | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        ax.scatter(*reference[:, :2].T.cpu().numpy(), s=1, c="0.75", label="data")
    ax.scatter(*points[:, :2].T.cpu().numpy(), s=1, c="C3", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
