"""LightningDataModules (registered kind ``"data"``): toy2d, digits, mnist, cifar10, cifar100, fake.

Every datamodule yields batches ``(x, y)`` and advertises what a model/task needs:
``dims`` (per-sample shape), ``data_kind`` ("vector" or "image"), ``num_classes``,
``n_bits`` (8 for dequantised 8-bit images, log2(17) for the 17-level digits, None for
continuous data) and ``dequantized``.
"""

from iresflow.data import digits, fake, images, toy2d  # noqa: F401  (imports register the datamodules)
from iresflow.data.digits import DigitsDataModule
from iresflow.data.fake import FakeDataModule
from iresflow.data.images import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageDataModule,
    MNISTDataModule,
    bits_per_dim,
)
from iresflow.data.toy2d import TOY_DENSITIES, Toy2DDataModule, sample_toy2d

__all__ = [
    "DigitsDataModule",
    "FakeDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "bits_per_dim",
    "TOY_DENSITIES",
    "Toy2DDataModule",
    "sample_toy2d",
]
