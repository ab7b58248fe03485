"""Two-dimensional toy densities (the FFJORD / Residual Flows test bed) as a datamodule.

Every density is a mixture of simple components, so each sampler returns the
points together with the index of the component that produced them; batches
are ``(x, label)`` like the image datamodules, and the label is there for
colouring plots (or a toy classification run).

The shapes and scales follow the usual definitions, so numbers are comparable
with the literature:

=============  ==========================================================  =======
name           what it is                                                  classes
=============  ==========================================================  =======
8gaussians     8 Gaussians (std 0.5/sqrt 2) on a circle of radius 2 sqrt 2  8
checkerboard   uniform on the 8 dark squares of a 4x4 board on [-4, 4]^2   8
2spirals       two interleaved Archimedean spirals, 1.5 turns each         2
moons          two half circles (noise 0.1), scaled by 2                   2
circles        concentric circles of radii 3 and 1.5 (noise 0.24)          2
pinwheel       5 arms, radially stretched Gaussians with a twist           5
rings          4 concentric rings, radii 0.75, 1.5, 2.25, 3 (noise 0.08)   4
=============  ==========================================================  =======

Training draws fresh samples every epoch (a dataset of ``train_size`` points
per epoch, never repeated), so training can be run by ``max_steps`` or by
epochs alike; validation and test sets are fixed and seeded. Every training
batch is drawn from its own key ``(seed, epoch, batch)``, so a run resumed in the
middle of an epoch continues with the batch it would have drawn next
(:mod:`iresflow.data.resumable`). Under DDP every rank draws different training
points (an epoch is still ``train_size`` points in all, like a distributed
sampler's pass over a dataset), while the validation and test sets are split
among the ranks by Lightning's sampler.
"""

from __future__ import annotations

import difflib
import math
from typing import Callable

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, TensorDataset

from iresflow.data.resumable import Draw, EpochSampler, ResumableLoader, draw_seed
from iresflow.registry import register

__all__ = ["TOY_DENSITIES", "sample_toy2d", "Toy2DDataModule", "ToyBatches"]

Sampler = Callable[[int, "torch.Generator | None"], "tuple[torch.Tensor, torch.Tensor]"]


def _randn(n: int, g, d: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=g)


def _rand(n: int, g, d: int = 1) -> torch.Tensor:
    return torch.rand(n, d, generator=g)


def _labels(n: int, k: int, g) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=g)


def _on_circle(angle: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def _eight_gaussians(n, g):
    k = _labels(n, 8, g)
    centres = 4.0 * _on_circle(k * (math.pi / 4))
    # FFJORD divides centre and noise by 1.414: radius 2.83, std 0.354
    return (centres + 0.5 * _randn(n, g)) / 1.414, k


# lower-left corners (in units of 2) of the 4x4 board's dark squares: i + j even
_DARK_SQUARES = torch.tensor([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0],
                             dtype=torch.float32)


def _checkerboard(n, g):
    k = _labels(n, len(_DARK_SQUARES), g)
    return 2.0 * (_DARK_SQUARES[k] + _rand(n, g, 2)), k


def _two_spirals(n, g):
    k = _labels(n, 2, g)
    t = torch.sqrt(_rand(n, g)).squeeze(1) * 3 * math.pi  # 540 degrees, sqrt for uniform arc density
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) + 0.5 * _rand(n, g, 2)
    sign = 1.0 - 2.0 * k.unsqueeze(1).float()  # the second arm is the first rotated by pi
    return sign * arm / 3.0 + 0.1 * _randn(n, g), k


def _moons(n, g):
    k = _labels(n, 2, g)
    t = math.pi * _rand(n, g).squeeze(1)
    upper = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    lower = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    x = torch.where(k.unsqueeze(1) == 0, upper, lower) + 0.1 * _randn(n, g)
    return 2.0 * x + torch.tensor([-1.0, -0.2]), k


def _circles(n, g):
    k = _labels(n, 2, g)
    radius = torch.where(k == 0, 1.0, 0.5).unsqueeze(1)
    x = radius * _on_circle(2 * math.pi * _rand(n, g).squeeze(1)) + 0.08 * _randn(n, g)
    return 3.0 * x, k


def _pinwheel(n, g, arms: int = 5, radial_std: float = 0.3, tangential_std: float = 0.1, rate: float = 0.25):
    k = _labels(n, arms, g)
    f = _randn(n, g) * torch.tensor([radial_std, tangential_std]) + torch.tensor([1.0, 0.0])
    # each arm twists more the further out it goes; rotation by -angle as in FFJORD
    angle = 2 * math.pi * k / arms + rate * torch.exp(f[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    x = torch.stack([c * f[:, 0] + s * f[:, 1], -s * f[:, 0] + c * f[:, 1]], dim=1)
    return 2.0 * x, k


def _rings(n, g):
    k = _labels(n, 4, g)
    radius = 0.75 * (k + 1).float().unsqueeze(1)
    return radius * _on_circle(2 * math.pi * _rand(n, g).squeeze(1)) + 0.08 * _randn(n, g), k


TOY_DENSITIES: dict[str, tuple[Sampler, int]] = {
    "8gaussians": (_eight_gaussians, 8),
    "checkerboard": (_checkerboard, len(_DARK_SQUARES)),
    "2spirals": (_two_spirals, 2),
    "moons": (_moons, 2),
    "circles": (_circles, 2),
    "pinwheel": (_pinwheel, 5),
    "rings": (_rings, 4),
}


def _check_name(dataset: str) -> str:
    if dataset not in TOY_DENSITIES:
        close = difflib.get_close_matches(dataset, TOY_DENSITIES, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown toy2d dataset {dataset!r}{hint} "
                         f"Available: {', '.join(sorted(TOY_DENSITIES))}")
    return dataset


def sample_toy2d(dataset: str, n: int, generator: torch.Generator | None = None,
                 return_labels: bool = False):
    """``n`` samples ``[n, 2]`` (float32) of a toy density; with the component labels if asked."""
    sampler, _ = TOY_DENSITIES[_check_name(dataset)]
    x, k = sampler(int(n), generator)
    x = x.float().contiguous()
    return (x, k.long()) if return_labels else x


class ToyBatches(Dataset):
    """The training batches of the toy densities: item ``b`` of epoch ``e`` is a fresh batch.

    Indexed by :class:`~iresflow.data.resumable.Draw` keys ``(epoch, b)`` (from an
    :class:`~iresflow.data.resumable.EpochSampler`), each batch ``(x, label)`` is drawn from a
    generator seeded by ``(seed, epoch, b)``: every epoch has new points, runs are reproducible,
    and a resumed epoch draws exactly the batches it would have drawn (whichever process or
    loader worker draws them). Under data parallelism the sampler deals the ``n_batches`` of
    an epoch out among the ranks, so every rank draws different points. Use it with
    ``DataLoader(batch_size=None)``; a plain integer ``b`` means batch ``b`` of epoch 0.
    """

    def __init__(self, dataset: str, batch_size: int, n_batches: int, seed: int = 0):
        self.dataset = _check_name(dataset)
        self.batch_size = int(batch_size)
        self.n_batches = int(n_batches)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, key: Draw | int):
        epoch, b = (key.epoch, key.index) if isinstance(key, Draw) else (0, int(key))
        if not 0 <= b < self.n_batches:
            raise IndexError(f"batch {b} of {self.n_batches}")
        g = torch.Generator().manual_seed(draw_seed(self.seed, epoch, b))
        return sample_toy2d(self.dataset, self.batch_size, g, return_labels=True)


@register("data", "toy2d", description="2D toy densities (8gaussians, checkerboard, 2spirals, moons, "
                                       "circles, pinwheel, rings), sampled on the fly")
class Toy2DDataModule(LightningDataModule):
    """Toy 2D densities: fresh training samples every epoch, fixed seeded val/test sets.

    Batches are ``(x [B, 2] float32, label [B] long)``; the label is the mixture
    component (plot colouring, or toy classification with ``num_classes``).
    ``train_size`` is the number of points per training epoch (rounded up to
    whole batches); with ``max_steps`` the epoch length only sets how often
    epoch-level hooks run.
    """

    data_kind = "vector"
    dims = (2,)
    n_bits = None          # continuous data: no discretisation term in the likelihood
    dequantized = False

    def __init__(self, dataset: str = "8gaussians", batch_size: int = 500, train_size: int = 50_000,
                 val_size: int = 2_000, test_size: int = 10_000, seed: int = 0, num_workers: int = 0,
                 eval_batch_size: int | None = None):
        super().__init__()
        self.dataset = _check_name(dataset)
        for key, value in (("batch_size", batch_size), ("train_size", train_size), ("val_size", val_size),
                           ("test_size", test_size)):
            if int(value) < 1:
                raise ValueError(f"toy2d: {key} must be at least 1, got {value}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.train_size, self.val_size, self.test_size = int(train_size), int(val_size), int(test_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.num_classes = TOY_DENSITIES[self.dataset][1]
        self.save_hyperparameters()
        self._train: ToyBatches | None = None
        self._val: TensorDataset | None = None
        self._test: TensorDataset | None = None

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """``n`` points of the true density, ``[n, 2]`` (e.g. for plots next to model samples)."""
        return sample_toy2d(self.dataset, n, generator, return_labels)

    def _fixed(self, n: int, offset: int) -> TensorDataset:
        g = torch.Generator().manual_seed(self.seed * 1_000 + offset)  # val and test differ
        return TensorDataset(*self.sample(n, g, return_labels=True))

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            n_batches = max(1, math.ceil(self.train_size / self.batch_size))
            self._train = ToyBatches(self.dataset, self.batch_size, n_batches, self.seed)
        if self._val is None:
            self._val = self._fixed(self.val_size, 1)
        if self._test is None:
            self._test = self._fixed(self.test_size, 2)

    def _loader(self, dataset, batch_size=None, **kw) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, **kw)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(self._train, shuffle=False, seed=self.seed, rank=rank, world_size=world)
        # batch_size=None: every item is a whole batch; the generator keeps the loader's own
        # seed draw off torch's global stream (the estimators' draws)
        return ResumableLoader(self._train, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0,
                               generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self._val, self.eval_batch_size, shuffle=False,
                            generator=torch.Generator().manual_seed(self.seed))

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self._test, self.eval_batch_size, shuffle=False,
                            generator=torch.Generator().manual_seed(self.seed))

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
