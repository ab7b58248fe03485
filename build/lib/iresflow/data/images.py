"""Image datamodules: MNIST, CIFAR-10, CIFAR-100 from local files (torchvision formats).

``task`` decides what a batch ``(x, y)`` holds:

- ``"density"``: 8-bit pixels are **uniformly dequantised**,
  ``x = (pixel + u) / 256`` with ``u ~ U(0, 1)`` per sub-pixel, so ``x`` lies in
  ``[0, 1)``. Validation/test images are dequantised too (by default with noise
  fixed per image, so every evaluation sees the same points); the alternative
  ``eval_dequantization="midpoint"`` uses ``(pixel + 0.5) / 256``.
  Convention for the likelihood: the model's ``log p(x)`` is a density on
  ``[0, 1]^D``; bits per dimension need the discretisation term of the
  ``2^n_bits`` bins, ``bpd = (-log p(x) + D log 256) / (D log 2)`` — see
  :func:`bits_per_dim`. The datamodules advertise this with ``n_bits = 8`` and
  ``dequantized = True``. (With uniform noise the expected bpd is an upper bound
  on the discrete model's bpd; with midpoints it is not a bound.)
- ``"classification"``: per-channel normalisation with the training-set mean
  and std; CIFAR training images get the usual augmentation (random crop 32
  with padding 4, horizontal flip); MNIST none.

No machine running this may reach the internet, so files are read from
``root`` (``download=False`` by default). When they are missing, the error is a
:class:`FileNotFoundError` that names every file and where it belongs.
What torchvision 0.29 accepts (and what this module adds):

- MNIST reads the *uncompressed* IDX files ``<root>/MNIST/raw/{train,t10k}-
  {images-idx3,labels-idx1}-ubyte`` (existence is checked, not checksums). The
  ``.gz`` files alone are not read by torchvision; this module gunzips them in
  place when only they are present.
- CIFAR reads the pickled batches in ``<root>/cifar-10-batches-py/``
  (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or
  ``<root>/cifar-100-python/`` (``train``, ``test``, ``meta``) and checks each
  file's **MD5** against the official release, so only the original files are
  accepted. When only the tarball (``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz``) sits in ``root``, this module extracts it.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.datasets.utils import check_integrity, extract_archive

from iresflow.data.resumable import Draw, EpochSampler, ResumableLoader, draw_seed
from iresflow.registry import register

__all__ = [
    "bits_per_dim",
    "DataFileError",
    "check_idx_file",
    "Dequantized",
    "ImageDataModule",
    "MNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
]

TASKS = ("density", "classification")
EVAL_DEQUANTIZATION = ("uniform", "midpoint")


def bits_per_dim(log_prob: torch.Tensor, num_dims: int, n_bits: int = 8) -> torch.Tensor:
    """Bits per dimension of 8-bit data from ``log p(x)`` (nats) of the density on ``[0, 1]^D``.

    ``x = (pixel + u) / 2^n_bits``, so the density in pixel units is
    ``p(x) / 2^(n_bits D)``; ``bpd = -log p(x) / (D ln 2) + n_bits``.
    """
    return -log_prob / (num_dims * math.log(2.0)) + n_bits


class Dequantized(Dataset):
    """A view of ``base`` (optionally a subset of it) with a transform and dequantisation.

    ``transform`` maps the base item's image to a tensor; with ``dequantize`` that
    tensor must hold integer pixel values (``PILToTensor``) and becomes
    ``(pixel + u) / 2^n_bits``: ``"uniform"`` draws ``u`` afresh for every draw (training),
    ``"fixed"`` draws it from a generator seeded by ``(seed, index)`` (the same
    noise at every evaluation), ``"midpoint"`` uses ``u = 0.5``.

    A training item is asked for by a :class:`~iresflow.data.resumable.Draw` key
    ``(epoch, index)``: its noise and its random augmentation are then drawn from a
    generator seeded by ``(seed, epoch, index)``, so they differ every epoch, do not touch
    torch's global random stream, and come back identically in a resumed epoch. A plain
    integer index draws them from torch's global stream.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None,
                 transform: Callable | None = None, dequantize: str | None = None,
                 seed: int = 0, n_bits: int = 8):
        if dequantize not in (None, "uniform", "fixed", "midpoint"):
            raise ValueError(f"dequantize must be None, 'uniform', 'fixed' or 'midpoint', not {dequantize!r}")
        self.base, self.transform, self.dequantize = base, transform, dequantize
        self.indices = None if indices is None else list(indices)
        self.seed, self.levels = int(seed), 2**n_bits

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, key: Draw | int):
        if isinstance(key, Draw):
            with torch.random.fork_rng(devices=[]):  # the item's own stream; the global one is untouched
                torch.manual_seed(draw_seed(self.seed, key.epoch, key.index))
                return self._item(key.index)
        return self._item(int(key))

    def _item(self, i: int):
        index = i if self.indices is None else self.indices[i]
        img, target = self.base[index]
        x = self.transform(img) if self.transform is not None else img
        if self.dequantize is not None:
            x = x.float()
            if self.dequantize == "uniform":
                u = torch.rand(x.shape)
            elif self.dequantize == "fixed":
                g = torch.Generator().manual_seed(self.seed * 10_000_019 + index)
                u = torch.rand(x.shape, generator=g)
            else:
                u = 0.5
            x = (x + u) / self.levels
        return x, int(target)


class ImageDataModule(LightningDataModule):
    """Shared machinery: subclasses say which torchvision dataset and how to check its files.

    Parameters common to every image datamodule:
      task: ``"density"`` (dequantised pixels in [0, 1)) or ``"classification"``
        (normalised, augmented).
      batch_size, eval_batch_size (defaults to batch_size), num_workers.
      val_split: held out of the training set for validation, a fraction in
        [0, 1) or a count; the split is seeded by ``seed``. With 0, validation
        runs on the test set (``val_is_test`` is then True).
      augment: None = the task's default (classification: yes; density: no).
        For density, True means horizontal flips (CIFAR) only.
      eval_dequantization: ``"uniform"`` (noise fixed per image) or ``"midpoint"``.
    """

    data_kind = "image"
    n_bits = 8
    dims: tuple[int, int, int] = (0, 0, 0)
    num_classes = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    flip_augment = False     # horizontal flips make sense for natural images, not digits
    crop_augment = False

    def __init__(self, task: str = "density", batch_size: int = 64, val_split: float = 0.0,
                 num_workers: int = 0, seed: int = 0, augment: bool | None = None,
                 eval_dequantization: str = "uniform", eval_batch_size: int | None = None,
                 drop_last: bool = False):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        if eval_dequantization not in EVAL_DEQUANTIZATION:
            raise ValueError(f"eval_dequantization must be one of {EVAL_DEQUANTIZATION}, "
                             f"not {eval_dequantization!r}")
        if val_split < 0:
            raise ValueError(f"val_split must be >= 0, not {val_split}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or batch_size)):
            if int(value) < 1:
                raise ValueError(f"{key} must be at least 1, got {value}")
        self.task = task
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.val_split = val_split
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.augment = (task == "classification") if augment is None else bool(augment)
        self.eval_dequantization = eval_dequantization
        self.drop_last = bool(drop_last)
        self.dequantized = task == "density"
        self.val_is_test = not val_split
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ------------------------------------------------------------- subclass hooks
    def _base(self, train: bool) -> Dataset:
        """The raw dataset (PIL images, integer targets), no transform."""
        raise NotImplementedError

    # ------------------------------------------------------------- transforms
    def _transform(self, train: bool) -> Callable:
        ops: list[Callable] = []
        if train and self.augment:
            if self.crop_augment and self.task == "classification":
                ops.append(T.RandomCrop(self.dims[1:], padding=4))
            if self.flip_augment:
                ops.append(T.RandomHorizontalFlip())
        if self.task == "density":
            ops.append(T.PILToTensor())  # integer pixels; Dequantized scales them
        else:
            ops += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(ops)

    def _view(self, base: Dataset, indices, train: bool) -> Dataset:
        if self.task == "density":
            mode = "uniform" if train else ("fixed" if self.eval_dequantization == "uniform" else "midpoint")
        else:
            mode = None
        return Dequantized(base, indices, self._transform(train), mode, seed=self.seed, n_bits=self.n_bits)

    # ------------------------------------------------------------- Lightning
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate"):
            base = self._base(train=True)
            n = len(base)
            n_val = int(round(self.val_split * n)) if self.val_split < 1 else int(self.val_split)
            if n_val >= n:
                raise ValueError(f"val_split={self.val_split} leaves no training data ({n} images)")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
            train_idx, val_idx = sorted(order[n_val:]), sorted(order[:n_val])
            self.train_set = self._view(base, train_idx, train=True)
            if n_val:
                self.val_set = self._view(base, val_idx, train=False)
        need_test = stage in (None, "test", "predict") or (self.val_is_test and stage in ("fit", "validate"))
        if self.test_set is None and need_test:
            self.test_set = self._view(self._base(train=False), None, train=False)
        if self.val_is_test and self.test_set is not None:
            self.val_set = self.test_set

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        # the loader's own generator: creating an iterator draws no number from torch's global stream
        common = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.seed))
        if not train:
            return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **common)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(dataset, shuffle=True, seed=self.seed, rank=rank, world_size=world)
        return ResumableLoader(dataset, sampler=sampler, batch_size=self.batch_size, drop_last=self.drop_last,
                               **common)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class DataFileError(ValueError):
    """A dataset file that is there but damaged (truncated, not the format it claims)."""


def check_idx_file(path: Path) -> None:
    """Check an IDX file's header against its size (a truncated download fails here, by name).

    IDX: two zero bytes, a type code (0x08: unsigned bytes), the number of dimensions ``d``,
    then ``d`` big-endian 32-bit sizes, then the data.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08 or not 1 <= head[3] <= 4:
            raise DataFileError(f"{path} is not an IDX file of bytes (header {head.hex() or 'empty'}); "
                                "replace it with the original MNIST file")
        dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        raise DataFileError(f"{path} is truncated (its header is incomplete); replace it with the original file")
    shape = [int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(head[3])]
    expected = 4 + 4 * head[3] + math.prod(shape)
    size = path.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataFileError(f"{path} is {what}: {'x'.join(map(str, shape))} bytes of data need a file of "
                            f"{expected} bytes, it has {size}; replace it (or its .gz) with the original file")


class _TorchvisionFiles(ImageDataModule):
    """A datamodule over a torchvision dataset stored under ``root``."""

    tv_class: type = tvd.VisionDataset
    title = ""

    def __init__(self, root: str = "data", task: str = "density", batch_size: int = 64,
                 val_split: float = 0.0, num_workers: int = 0, download: bool = False, seed: int = 0,
                 augment: bool | None = None, eval_dequantization: str = "uniform",
                 eval_batch_size: int | None = None, drop_last: bool = False):
        super().__init__(task=task, batch_size=batch_size, val_split=val_split, num_workers=num_workers,
                         seed=seed, augment=augment, eval_dequantization=eval_dequantization,
                         eval_batch_size=eval_batch_size, drop_last=drop_last)
        self.root = str(root)
        self.download = bool(download)
        self.save_hyperparameters()

    # --- files
    def _unpack_local(self) -> None:
        """Turn locally present archives into what torchvision reads (no network)."""

    def _missing_message(self) -> str:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Runs once per node (Lightning): unpack local archives, download if asked."""
        self._unpack_local()
        if self.download:
            for train in (True, False):
                self.tv_class(self.root, train=train, download=True)

    def _base(self, train: bool) -> Dataset:
        self._unpack_local()
        try:
            return self.tv_class(self.root, train=train, download=self.download)
        except RuntimeError as err:
            if "not found" not in str(err).lower():
                raise
            raise FileNotFoundError(self._missing_message()) from err

    def _report(self, folder: Path, files: Sequence[tuple[str, str | None]], extra: str) -> str:
        missing = [f for f, _ in files if not (folder / f).is_file()]
        corrupt = [f for f, md5 in files if (folder / f).is_file() and md5 and not check_integrity(folder / f, md5)]
        parts = [f"{self.title} files not found (or not usable) under root={self.root!r}."]
        if missing:
            parts.append(f"Missing in {folder}: {', '.join(missing)}.")
        if corrupt:
            parts.append(f"Present but not the original release (MD5 mismatch) in {folder}: {', '.join(corrupt)}.")
        parts.append(extra)
        parts.append("Or set data.download=true (download=True) to fetch them when a network is available.")
        return " ".join(parts)  # one line: the error is printed as one line


@register("data", "mnist", description="MNIST 28x28 digits from <root>/MNIST/raw (density or classification)")
class MNISTDataModule(_TorchvisionFiles):
    __doc__ = ("MNIST (1x28x28, 10 classes). Files: ``<root>/MNIST/raw/`` with the four IDX files.\n\n"
               + ImageDataModule.__doc__.split("\n", 1)[1].lstrip("\n"))
    tv_class = tvd.MNIST
    title = "MNIST"
    dims = (1, 28, 28)
    num_classes = 10
    mean, std = (0.1307,), (0.3081,)
    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    @property
    def raw_folder(self) -> Path:
        return Path(self.root) / "MNIST" / "raw"

    def _unpack_local(self) -> None:
        # torchvision reads only the uncompressed files; gunzip the .gz ones the user put there
        for name in self.FILES:
            raw, packed = self.raw_folder / name, self.raw_folder / (name + ".gz")
            if not raw.is_file() and packed.is_file():
                tmp = raw.with_suffix(".part")
                try:
                    with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except (EOFError, gzip.BadGzipFile) as err:  # a truncated or damaged archive
                    tmp.unlink(missing_ok=True)
                    raise DataFileError(f"{packed} cannot be unpacked ({err}); replace it with the original "
                                        "file") from err
                os.replace(tmp, raw)

    def _base(self, train: bool) -> Dataset:
        self._unpack_local()
        for name in self.FILES:
            if (self.raw_folder / name).is_file():
                check_idx_file(self.raw_folder / name)
        return super()._base(train)

    def _missing_message(self) -> str:
        folder = self.raw_folder
        listing = ", ".join(str(folder / f) for f in self.FILES)
        extra = ("Put the four MNIST IDX files there: " + listing +
                 " (the original .gz files, e.g. train-images-idx3-ubyte.gz, may be put in the same "
                 "folder instead: they are unpacked on first use).")
        return self._report(folder, [(f, None) for f in self.FILES], extra)


class _CIFARFiles(_TorchvisionFiles):
    flip_augment = True
    crop_augment = True
    dims = (3, 32, 32)

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.tv_class.base_folder

    def _files(self) -> list[tuple[str, str]]:
        c = self.tv_class
        return [(f, md5) for f, md5 in c.train_list + c.test_list] + [(c.meta["filename"], c.meta["md5"])]

    def _unpack_local(self) -> None:
        # torchvision extracts the tarball only inside download(); do it here offline
        tarball = Path(self.root) / self.tv_class.filename
        if tarball.is_file() and not all((self.folder / f).is_file() for f, _ in self._files()):
            extract_archive(str(tarball), self.root)

    def _missing_message(self) -> str:
        names = ", ".join(f for f, _ in self._files())
        extra = (f"Put the original python-version files ({names}) in {self.folder}/, "
                 f"or the tarball {self.tv_class.filename} in {self.root}/ (it is extracted there). "
                 "torchvision checks their MD5 sums, so only the unmodified release is accepted.")
        return self._report(self.folder, self._files(), extra)


@register("data", "cifar10", description="CIFAR-10 32x32 from <root>/cifar-10-batches-py (density or classification)")
class CIFAR10DataModule(_CIFARFiles):
    __doc__ = ("CIFAR-10 (3x32x32, 10 classes). Files: ``<root>/cifar-10-batches-py/`` with data_batch_1..5, "
               "test_batch, batches.meta (or ``<root>/cifar-10-python.tar.gz``).\n\n"
               + ImageDataModule.__doc__.split("\n", 1)[1].lstrip("\n"))
    tv_class = tvd.CIFAR10
    title = "CIFAR-10"
    num_classes = 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@register("data", "cifar100", description="CIFAR-100 32x32 from <root>/cifar-100-python (density or classification)")
class CIFAR100DataModule(_CIFARFiles):
    __doc__ = ("CIFAR-100 (3x32x32, 100 fine classes). Files: ``<root>/cifar-100-python/`` with train, test, "
               "meta (or ``<root>/cifar-100-python.tar.gz``).\n\n"
               + ImageDataModule.__doc__.split("\n", 1)[1].lstrip("\n"))
    tv_class = tvd.CIFAR100
    title = "CIFAR-100"
    num_classes = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
