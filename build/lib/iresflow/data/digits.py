"""scikit-learn's handwritten digits: 1797 real 8x8 images in 17 grey levels, no download.

The images ship inside scikit-learn (``sklearn.datasets.load_digits``; the
optional extra ``iresflow[digits]``). Every pixel is an integer level
``0..16``, so the data are 17-level, not 8-bit:

- ``task="density"``: uniform dequantisation ``x = (level + u) / 17`` with
  ``u ~ U(0, 1)``, so ``x`` lies in ``[0, 1)``; validation and test noise is
  fixed per image. The density of the discrete data is ``p(x) / 17^D``, so
  ``bpd = -log p(x) / (D ln 2) + log2(17)``: the datamodule advertises
  ``n_bits = log2(17)`` (about 4.09 bits per dimension, not 8), which the
  density task's bits/dim use as the offset.
- ``task="classification"``: ``level / 16`` normalised with the training
  set's mean and std; 10 classes.

``flatten=True`` gives 64-d vectors (``data_kind = "vector"``) for the fully
connected flow; otherwise ``1 x 8 x 8`` images. The test split is fixed
(``test_size`` images chosen by ``split_seed``, the same for every run seed);
``val_split`` holds images out of the rest, seeded by ``seed`` as the other
datamodules do (0: validate on the test set).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from iresflow.registry import register

__all__ = ["DigitsDataModule", "DIGITS_LEVELS", "load_digit_levels"]

DIGITS_LEVELS = 17  # grey levels 0..16
EXTRA_HINT = "the digits data need scikit-learn: pip install 'iresflow[digits]' (or pip install scikit-learn)"


def load_digit_levels() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images as integer levels ``[N, 1, 8, 8]`` (uint8, 0..16) and their labels ``[N]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(EXTRA_HINT) from err
    bunch = load_digits()
    levels = torch.from_numpy(bunch.images.round()).to(torch.uint8).unsqueeze(1)
    return levels, torch.from_numpy(bunch.target).long()


class _Digits(Dataset):
    """Selected images, as the task needs them.

    ``mode``: ``"uniform"`` (fresh dequantisation noise per access), ``"fixed"``
    (noise drawn from ``(seed, index)``: the same at every evaluation),
    ``"midpoint"`` (``u = 1/2``), or ``"normalized"`` (classification:
    ``(level / 16 - mean) / std``).
    """

    def __init__(self, levels: torch.Tensor, labels: torch.Tensor, indices: list[int], mode: str,
                 seed: int = 0, mean: float = 0.0, std: float = 1.0, flatten: bool = False):
        self.levels, self.labels, self.indices = levels, labels, list(indices)
        self.mode, self.seed, self.mean, self.std, self.flatten = mode, int(seed), mean, std, flatten

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        level = self.levels[index].float()
        if self.mode == "normalized":
            x = (level / (DIGITS_LEVELS - 1) - self.mean) / self.std
        else:
            if self.mode == "uniform":
                u = torch.rand(level.shape)
            elif self.mode == "fixed":
                u = torch.rand(level.shape, generator=torch.Generator().manual_seed(self.seed * 10_000_019 + index))
            else:
                u = torch.full_like(level, 0.5)
            x = (level + u) / DIGITS_LEVELS
        return (x.flatten() if self.flatten else x), int(self.labels[index])


@register("data", "digits", description="scikit-learn's 8x8 handwritten digits (1797 real images, 17 levels, "
                                        "no download; density or classification)")
class DigitsDataModule(LightningDataModule):
    """The 8x8 digits, both tasks (see the module docstring).

    Args:
        task: ``"density"`` or ``"classification"``.
        batch_size, eval_batch_size (default batch_size), num_workers, drop_last.
        test_size: images in the fixed test split (default 360, 20%).
        split_seed: seed of the test split (fixed across runs).
        val_split: held out of the training images, a fraction in [0, 1) or a count,
            seeded by ``seed`` (0: validation runs on the test set).
        flatten: 64-d vectors instead of ``1 x 8 x 8`` images.
        eval_dequantization: ``"uniform"`` (noise fixed per image) or ``"midpoint"``.
    """

    num_classes = 10
    n_levels = DIGITS_LEVELS
    #: bits per dimension of the discretisation: log2(17), the offset of bits/dim
    n_bits = math.log2(DIGITS_LEVELS)

    def __init__(self, task: str = "density", batch_size: int = 64, val_split: float = 0.0, test_size: int = 360,
                 split_seed: int = 0, seed: int = 0, flatten: bool = False, num_workers: int = 0,
                 eval_dequantization: str = "uniform", eval_batch_size: int | None = None,
                 drop_last: bool = False):
        super().__init__()
        if task not in ("density", "classification"):
            raise ValueError(f"task must be 'density' or 'classification', not {task!r}")
        if eval_dequantization not in ("uniform", "midpoint"):
            raise ValueError(f"eval_dequantization must be 'uniform' or 'midpoint', not {eval_dequantization!r}")
        if not 0 < test_size < 1797:
            raise ValueError(f"test_size must be between 1 and 1796 images, not {test_size}")
        if val_split < 0:
            raise ValueError(f"val_split must be >= 0, not {val_split}")
        self.task, self.flatten = task, bool(flatten)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.val_split, self.test_size, self.split_seed = val_split, int(test_size), int(split_seed)
        self.seed, self.num_workers, self.drop_last = int(seed), int(num_workers), bool(drop_last)
        self.eval_dequantization = eval_dequantization
        self.dims = (64,) if self.flatten else (1, 8, 8)
        self.data_kind = "vector" if self.flatten else "image"
        self.dequantized = task == "density"
        self.val_is_test = not val_split
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.save_hyperparameters()

    def split(self, n: int) -> tuple[list[int], list[int], list[int]]:
        """``(train, val, test)`` indices of ``n`` images: the test split from ``split_seed``, the
        validation split of the rest from ``seed``."""
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        test, rest = sorted(order[: self.test_size]), order[self.test_size:]
        n_val = int(round(self.val_split * len(rest))) if self.val_split < 1 else int(self.val_split)
        if n_val >= len(rest):
            raise ValueError(f"val_split={self.val_split} leaves no training data ({len(rest)} images)")
        rest = [rest[i] for i in torch.randperm(len(rest), generator=torch.Generator().manual_seed(self.seed))]
        return sorted(rest[n_val:]), sorted(rest[:n_val]), test

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        levels, labels = load_digit_levels()
        train, val, test = self.split(len(levels))
        if self.task == "classification":
            scaled = levels[train].float() / (DIGITS_LEVELS - 1)
            stats = {"mean": float(scaled.mean()), "std": float(scaled.std())}
            self.mean, self.std = (stats["mean"],), (stats["std"],)

            def view(indices, train_split):
                return _Digits(levels, labels, indices, "normalized", flatten=self.flatten, **stats)
        else:
            eval_mode = "fixed" if self.eval_dequantization == "uniform" else "midpoint"

            def view(indices, train_split):
                return _Digits(levels, labels, indices, "uniform" if train_split else eval_mode,
                               seed=self.seed, flatten=self.flatten)
        self.train_set = view(train, True)
        self.test_set = view(test, False)
        self.val_set = view(val, False) if val else self.test_set

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          drop_last=train and self.drop_last, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
