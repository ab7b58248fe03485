"""Random images (torchvision ``FakeData``) with the same interface as the real image datamodules.

For tests and smoke runs: no files, any image size, both tasks. Each image is a
deterministic function of its index (and ``seed``), so train/val/test never overlap.
"""

from __future__ import annotations

from typing import Sequence

from torch.utils.data import Dataset
from torchvision.datasets import FakeData

from iresflow.data.images import ImageDataModule
from iresflow.registry import register

__all__ = ["FakeDataModule"]


@register("data", "fake", description="random images (torchvision FakeData) for tests, any size, both tasks")
class FakeDataModule(ImageDataModule):
    """Random 8-bit images of shape ``image_size`` (C, H, W) with ``num_classes`` labels.

    ``size``/``val_size``/``test_size`` images per split; the task works as for the
    real datamodules (density: dequantised to [0, 1); classification: normalised
    with mean 0.5 and std 0.5 per channel, no augmentation unless ``augment``).
    """

    def __init__(self, image_size: Sequence[int] = (3, 32, 32), num_classes: int = 10, size: int = 64,
                 val_size: int = 32, test_size: int = 32, batch_size: int = 16, task: str = "density",
                 seed: int = 0, num_workers: int = 0, augment: bool | None = False,
                 eval_dequantization: str = "uniform", eval_batch_size: int | None = None,
                 drop_last: bool = False):
        super().__init__(task=task, batch_size=batch_size, val_split=0.0, num_workers=num_workers,
                         seed=seed, augment=augment, eval_dequantization=eval_dequantization,
                         eval_batch_size=eval_batch_size, drop_last=drop_last)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 3:
            raise ValueError(f"image_size must be (C, H, W), not {image_size}")
        self.dims = image_size
        self.num_classes = int(num_classes)
        for key, value in (("size", size), ("val_size", val_size), ("test_size", test_size)):
            if int(value) < 1:
                raise ValueError(f"fake: {key} must be at least 1, got {value}")
        self.size, self.val_size, self.test_size = int(size), int(val_size), int(test_size)
        self.mean = (0.5,) * image_size[0]
        self.std = (0.5,) * image_size[0]
        self.flip_augment = image_size[0] == 3
        self.crop_augment = image_size[0] == 3
        self.val_is_test = False
        self.save_hyperparameters()

    def _fake(self, size: int, offset: int) -> Dataset:
        # FakeData seeds image i with i + random_offset: disjoint offsets keep splits apart
        return FakeData(size=size, image_size=self.dims, num_classes=self.num_classes,
                        random_offset=self.seed * 10_000_000 + offset)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._view(self._fake(self.size, 0), None, train=True)
        if self.val_set is None:
            self.val_set = self._view(self._fake(self.val_size, self.size), None, train=False)
        if self.test_set is None:
            self.test_set = self._view(self._fake(self.test_size, self.size + self.val_size), None, train=False)
