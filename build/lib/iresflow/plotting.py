"""Pictures of a run (PNG, matplotlib with the headless Agg backend).

- :func:`density_2d`: the data, the learned density and samples through the
  inverse, side by side on the same axes;
- :func:`scatter_2d`: samples alone (``iresflow sample`` in 2D);
- :func:`image_grid`, :func:`reconstructions`: image samples, and validation
  images above their reconstructions ``inverse(forward(x))``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg", force=False)  # never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["density_2d", "scatter_2d", "image_grid", "reconstructions", "plot_bounds"]


def plot_bounds(points: torch.Tensor, minimum: float = 4.0, margin: float = 1.1) -> float:
    """Half-width of a square window holding (almost) every point, at least ``minimum``."""
    if points is None or len(points) == 0:
        return minimum
    q = torch.quantile(points.abs().float().flatten(), 0.995).item()
    return max(minimum, math.ceil(q * margin * 2) / 2)


def _hist(ax, pts: torch.Tensor, b: float, title: str, bins: int = 100) -> None:
    ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=bins, range=[[-b, b], [-b, b]], cmap="viridis")
    _frame(ax, b, title)


def _frame(ax, b: float, title: str) -> None:
    ax.set_xlim(-b, b)
    ax.set_ylim(-b, b)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)


@torch.no_grad()
def density_2d(log_prob: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor | None,
               samples: torch.Tensor | None, path: str | Path, *, bound: float | None = None,
               n_grid: int = 150, device: torch.device | str | None = None) -> Path:
    """Three panels: data histogram, ``exp(log_prob)`` on a grid, sample histogram."""
    ref = data if data is not None else samples
    b = bound if bound is not None else plot_bounds(ref.cpu() if ref is not None else None)
    side = torch.linspace(-b, b, n_grid)
    xx, yy = torch.meshgrid(side, side, indexing="xy")
    grid = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    if device is not None:
        grid = grid.to(device)
    logp = log_prob(grid).detach().float().cpu()
    density = torch.exp(logp - logp[torch.isfinite(logp)].max()).reshape(n_grid, n_grid)
    density = torch.nan_to_num(density, nan=0.0)

    panels = (data is not None) + 1 + (samples is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4.2))
    axes = list(axes) if panels > 1 else [axes]
    i = 0
    if data is not None:
        _hist(axes[i], data.cpu().float(), b, "data")
        i += 1
    axes[i].imshow(density.numpy(), extent=(-b, b, -b, b), origin="lower", cmap="viridis")
    _frame(axes[i], b, "learned density")
    i += 1
    if samples is not None:
        s = samples.cpu().float()
        s = s[torch.isfinite(s).all(1)]
        _hist(axes[i], s, b, "samples (inverse)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def scatter_2d(points: torch.Tensor, path: str | Path, *, title: str = "samples") -> Path:
    pts = points.detach().cpu().float()
    b = plot_bounds(pts)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.5)
    _frame(ax, b, title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(images.detach().cpu().float().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)


def image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Images ``[N, C, H, W]`` in ``[0, 1]`` as one PNG grid."""
    from torchvision.utils import save_image

    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(_grid(images, nrow), path)
    return path


def reconstructions(x: torch.Tensor, x_rec: torch.Tensor, path: str | Path) -> Path:
    """Originals (top row) over their reconstructions (bottom row)."""
    n = len(x)
    return image_grid(torch.cat([x, x_rec]), path, nrow=n)
