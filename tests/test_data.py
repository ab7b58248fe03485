"""Datamodules: toy 2D samplers, MNIST/CIFAR from tiny files in the real on-disk formats, FakeData.

On CIFAR checksums: torchvision 0.29's CIFAR10/CIFAR100 accept only files whose MD5
matches the official release (``check_integrity`` in ``_check_integrity`` and
``_load_meta``), so no small home-made file can pass. The reading tests therefore
replace ``torchvision.datasets.cifar.check_integrity`` with an existence check —
everything else (paths, pickle layout, decoding, our transforms) is the real code —
and a separate test shows that, unpatched, the same files are rejected with an
error that names them as MD5 mismatches. MNIST has no checksum on the raw files.
"""

import gzip
import math
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from iresflow import registry
from iresflow.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FakeDataModule,
    MNISTDataModule,
    Toy2DDataModule,
    bits_per_dim,
    sample_toy2d,
)

N = 4000


def _toy(name, n=N, seed=0):
    return sample_toy2d(name, n, torch.Generator().manual_seed(seed), return_labels=True)


def _polar(x):
    return x.norm(dim=1), torch.atan2(x[:, 1], x[:, 0])


# --------------------------------------------------------------------------- toy 2D
@pytest.mark.parametrize("name", ["8gaussians", "checkerboard", "2spirals", "moons", "circles", "pinwheel", "rings"])
def test_toy_shapes_dtype_and_reproducible(name):
    x, k = _toy(name, 257)
    assert x.shape == (257, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert k.shape == (257,) and k.dtype == torch.long
    assert torch.equal(x, _toy(name, 257)[0])               # same seed, same points
    assert not torch.equal(x, _toy(name, 257, seed=1)[0])
    assert k.min() >= 0 and k.max() < Toy2DDataModule(dataset=name).num_classes


def test_8gaussians_clusters_at_eight_centres():
    x, k = _toy("8gaussians")
    radius, std = 4 / 1.414, 0.5 / 1.414
    centres = radius * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1)
    d = x - centres
    assert d.mean(0).abs().max() < 0.03 and abs(d.std() - std) < 0.02
    nearest = torch.cdist(x, radius * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                                                   torch.sin(torch.arange(8) * math.pi / 4)], 1)).argmin(1)
    assert (nearest == k).float().mean() > 0.99
    assert torch.bincount(k, minlength=8).min() > N / 8 * 0.8   # all eight used


def test_checkerboard_fills_dark_squares_only():
    x, _ = _toy("checkerboard")
    assert x.abs().max() <= 4.0
    cells = torch.floor(x / 2).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()        # dark squares only
    counts = torch.bincount(((cells[:, 0] + 2) * 4 + cells[:, 1] + 2), minlength=16)
    assert (counts > 0).sum() == 8 and counts[counts > 0].min() > N / 8 * 0.8


def test_circles_and_rings_radii():
    x, k = _toy("circles")
    r, _ = _polar(x)
    for label, radius in [(0, 3.0), (1, 1.5)]:
        assert abs(r[k == label].median() - radius) < 0.05
    assert ((r - 3).abs().minimum((r - 1.5).abs()) < 0.75).float().mean() > 0.99
    x, k = _toy("rings")
    r, _ = _polar(x)
    for label, radius in enumerate([0.75, 1.5, 2.25, 3.0]):
        assert abs(r[k == label].median() - radius) < 0.03
    gap = torch.stack([(r - c).abs() for c in (0.75, 1.5, 2.25, 3.0)]).min(0).values
    assert (gap < 0.3).float().mean() > 0.99


def test_moons_moments():
    x, k = _toy("moons")
    # half circles (cos t, sin t) and (1 - cos t, 0.5 - sin t), t ~ U(0, pi), then 2x + (-1, -0.2)
    mean = torch.tensor([2 * 0.5 - 1.0, 2 * 0.25 - 0.2])  # raw means (1/2, 1/4) when the moons are balanced
    assert torch.allclose(x.mean(0), mean, atol=0.06)
    upper_y = 2 * (2 / math.pi) - 0.2
    assert abs(x[k == 0, 1].mean() - upper_y) < 0.05
    assert abs(x[k == 1, 1].mean() - (2 * (0.5 - 2 / math.pi) - 0.2)) < 0.05
    assert 1.6 < x[:, 0].std() < 1.85 and 0.9 < x[:, 1].std() < 1.1


def test_two_spirals_lie_on_the_spirals():
    x, _ = _toy("2spirals")
    assert x.mean(0).abs().max() < 0.1 and 1.4 < x.std() < 1.8
    # arm points are t(-cos t, sin t)/3 (and their negatives): polar angle + 3r = 0 (mod pi)
    r, theta = _polar(x)
    far = 3 * r > 4
    dev = torch.remainder(theta + 3 * r + math.pi / 2, math.pi) - math.pi / 2
    assert dev[far].abs().median() < 0.45                        # uniform angles would give pi/4
    g = torch.randn(N, 2) * x.std(0)
    r, theta = _polar(g)
    dev = torch.remainder(theta + 3 * r + math.pi / 2, math.pi) - math.pi / 2
    assert dev[3 * r > 4].abs().median() > 0.65                  # the check rejects a blob


def test_pinwheel_arms():
    x, _ = _toy("pinwheel")
    r, theta = _polar(x)
    assert abs(r.median() - 2.0) < 0.1
    # angle = -(2 pi k / 5 + 0.25 exp(r / 2)) + small tangential part
    period = 2 * math.pi / 5
    dev = torch.remainder(theta + 0.25 * torch.exp(r / 2) + period / 2, period) - period / 2
    assert dev.abs().quantile(0.9) < 0.25


def test_unknown_toy_name_suggests():
    with pytest.raises(ValueError, match=r"did you mean 'moons'"):
        Toy2DDataModule(dataset="moon")
    with pytest.raises(ValueError, match="checkerboard"):
        registry.build("data", "toy2d", dataset="chekerboard")


def test_toy_datamodule_stream_and_fixed_sets():
    dm = registry.build("data", "toy2d", dataset="rings", batch_size=64, train_size=200,
                        val_size=100, test_size=50, seed=3)
    assert dm.dims == (2,) and dm.data_kind == "vector" and dm.num_classes == 4
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch1 = list(loader)
    loader.sampler.set_epoch(1)  # what Lightning does at every epoch start
    epoch2 = list(loader)
    assert len(loader) == len(epoch1) == 4                      # ceil(200 / 64) whole batches
    assert all(x.shape == (64, 2) and y.shape == (64,) for x, y in epoch1)
    assert not torch.equal(epoch1[0][0], epoch2[0][0])          # fresh samples each epoch
    again = Toy2DDataModule(dataset="rings", batch_size=64, train_size=200, seed=3)
    assert torch.equal(next(iter(again.train_dataloader()))[0], epoch1[0][0])  # reproducible
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert val.shape == (100, 2) and torch.equal(val, torch.cat([x for x, _ in dm.val_dataloader()]))
    test = torch.cat([x for x, _ in dm.test_dataloader()])
    assert test.shape == (50, 2) and not torch.equal(test, val[:50])
    assert dm.sample(10, torch.Generator().manual_seed(0)).shape == (10, 2)


def test_toy_training_runs_by_max_steps(tmp_path):
    import lightning.pytorch as pl

    class Fit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Parameter(torch.zeros(2))

        def training_step(self, batch, _):
            x, _ = batch
            return ((x - self.mu) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = Toy2DDataModule(dataset="moons", batch_size=32, train_size=64)
    trainer = pl.Trainer(max_steps=5, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(Fit(), datamodule=dm)
    assert trainer.global_step == 5 and trainer.current_epoch >= 2   # crossed epochs of 2 batches


# --------------------------------------------------------------------------- resumable training data
def _loaders(kind, workers=0):
    if kind == "toy":
        dm = Toy2DDataModule("moons", batch_size=8, train_size=56, seed=3, num_workers=workers)
    else:
        task = "density" if kind == "fake-density" else "classification"
        # density with flips (augment) and uniform noise; classification with crops and flips
        dm = FakeDataModule(image_size=(3, 8, 8), size=44, batch_size=8, task=task, augment=True, seed=5,
                            num_workers=workers)
    dm.setup("fit")
    return dm


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("kind, workers", [("toy", 0), ("fake-density", 0), ("fake-classification", 0),
                                           ("toy", 2), ("fake-density", 2)])
def test_training_loaders_resume_in_the_middle_of_an_epoch(kind, workers):
    """A loader stopped after k batches and restored from its state_dict hands out exactly the rest of
    the epoch the uninterrupted loader hands out; its draws leave torch's global stream alone."""
    dm = _loaders(kind, workers)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    before = torch.get_rng_state()
    full = list(loader)
    assert torch.equal(torch.get_rng_state(), before)  # noise, augmentation, order: own generators
    stopped = dm.train_dataloader()
    stopped.sampler.set_epoch(2)
    it = iter(stopped)
    first = [next(it) for _ in range(3)]
    state = stopped.state_dict()
    assert state == {"epoch": 2, "batches": 3, "world_size": 1}
    resumed = _loaders(kind, workers).train_dataloader()  # a new process: a new datamodule and loader
    resumed.load_state_dict(state)
    assert _same(first + list(resumed), full)
    assert len(resumed) == len(full)  # the epoch's length is unchanged (Lightning counts on it)
    # a state saved at the end of the epoch resumes with the next one, which draws anew
    after_epoch = _loaders(kind, workers).train_dataloader()
    after_epoch.load_state_dict({"epoch": 2, "batches": len(full), "world_size": 1})
    nxt = list(after_epoch)
    assert after_epoch.sampler.epoch == 3 and len(nxt) == len(full) and not torch.equal(nxt[0][0], full[0][0])
    loader.sampler.set_epoch(3)
    assert _same(list(loader), nxt)


def test_image_training_loader_splits_every_epoch_among_ranks():
    """Under DDP each rank draws its own share of every epoch; together they are the epoch."""
    from iresflow.data.resumable import EpochSampler

    dm = FakeDataModule(image_size=(1, 4, 4), size=24, batch_size=4, task="classification", seed=1)
    dm.setup("fit")
    ranks = [EpochSampler(dm.train_set, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        parts = [[key.index for key in sampler] for sampler in ranks]
        assert len(parts[0]) == len(parts[1]) == 12 and sorted(parts[0] + parts[1]) == list(range(24))
        assert all(key.epoch == epoch for sampler in ranks for key in sampler)
    assert parts[0] != [key.index for key in EpochSampler(dm.train_set, shuffle=True, seed=1, world_size=2)]


# --------------------------------------------------------------------------- MNIST
def _write_idx(path, array, gz):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(header + array.tobytes())


def _make_mnist(root, n_train=20, n_test=8, gz=False):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(raw / f"{split}-images-idx3-ubyte", images, gz)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels, gz)
        data[split] = (torch.from_numpy(images), torch.from_numpy(labels).long())
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_density_from_idx_files(tmp_path, gz):
    ref = _make_mnist(tmp_path, gz=gz)
    dm = registry.build("data", "mnist", root=str(tmp_path), batch_size=8, val_split=0.25, task="density")
    assert (dm.dims, dm.num_classes, dm.data_kind, dm.n_bits, dm.dequantized) == ((1, 28, 28), 10, "image", 8, True)
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= 0 and x.max() < 1
    # dequantised: floor(256 x) recovers the stored pixel, and the noise is not constant
    xs, ys = zip(*(dm.train_set[i] for i in range(len(dm.train_set))))
    xs = torch.stack(xs)
    pixels = ref["train"][0][dm.train_set.indices].unsqueeze(1)
    assert torch.equal(torch.floor(xs * 256).long(), pixels.long())
    assert torch.equal(torch.tensor(ys), ref["train"][1][dm.train_set.indices])
    frac = xs * 256 - pixels
    assert 0.45 < frac.mean() < 0.55 and frac.std() > 0.25
    # evaluation noise is fixed per image: two passes agree
    v1 = torch.cat([v for v, _ in dm.val_dataloader()])
    v2 = torch.cat([v for v, _ in dm.val_dataloader()])
    assert torch.equal(v1, v2) and torch.equal(torch.floor(v1 * 256).long(),
                                               ref["train"][0][dm.val_set.indices].unsqueeze(1).long())
    dm.setup("test")
    t, _ = next(iter(dm.test_dataloader()))
    assert t.shape == (8, 1, 28, 28) and torch.equal(torch.floor(t * 256).long(), ref["t10k"][0].unsqueeze(1).long())


def test_mnist_classification_normalised_and_val_on_test(tmp_path):
    ref = _make_mnist(tmp_path)
    dm = MNISTDataModule(root=str(tmp_path), task="classification", batch_size=20, eval_dequantization="midpoint")
    dm.setup("fit")
    assert dm.val_is_test and len(dm.val_set) == 8 and not dm.dequantized
    x, y = next(iter(dm.val_dataloader()))
    expected = (ref["t10k"][0].float().unsqueeze(1) / 255 - 0.1307) / 0.3081
    assert torch.allclose(x, expected, atol=1e-5) and torch.equal(y, ref["t10k"][1])


def test_mnist_midpoint_eval(tmp_path):
    ref = _make_mnist(tmp_path)
    dm = MNISTDataModule(root=str(tmp_path), eval_dequantization="midpoint", batch_size=8)
    dm.setup("test")
    t, _ = next(iter(dm.test_dataloader()))
    assert torch.allclose(t, (ref["t10k"][0][:8].float().unsqueeze(1) + 0.5) / 256)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_mnist_file_is_named(tmp_path, gz):
    """A download cut short: the error names the damaged file and what to do, in one line."""
    from iresflow.data.images import DataFileError

    _make_mnist(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / "MNIST" / "raw" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError) as info:
        MNISTDataModule(root=str(tmp_path)).setup("fit")
    msg = str(info.value)
    assert str(path) in msg and "replace it" in msg and "\n" not in msg
    assert ("truncated" in msg) or gz
    if not gz:
        assert not (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.part").exists()


def test_mnist_missing_files_message(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    msg = str(info.value)
    raw = os.path.join(str(tmp_path / "nowhere"), "MNIST", "raw")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert os.path.join(raw, name) in msg
    assert "data.download=true" in msg


# --------------------------------------------------------------------------- CIFAR
def _make_cifar(root, hundred=False, n_per_file=4, tarball=False):
    rng = np.random.default_rng(1)
    cls = CIFAR100DataModule.tv_class if hundred else CIFAR10DataModule.tv_class
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    ref = {}
    for name, _ in cls.train_list + cls.test_list:
        images = rng.integers(0, 256, (n_per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 100 if hundred else 10, n_per_file).tolist()
        # the release's layout: rows of 3072 bytes (R plane, G plane, B plane, each row-major)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.reshape(n_per_file, -1), label_key: labels}, f)
        ref[name] = (torch.from_numpy(images), torch.tensor(labels))
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(100 if hundred else 10)]}, f)
    if tarball:
        with tarfile.open(root / cls.filename, "w:gz") as tar:
            tar.add(folder, arcname=cls.base_folder)
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    return ref


@pytest.fixture
def no_md5(monkeypatch):
    """Accept any existing file in place of the official CIFAR release (see module docstring)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("tarball", [False, True])
def test_cifar10_density_from_pickles(tmp_path, no_md5, tarball):
    ref = _make_cifar(tmp_path, tarball=tarball)
    dm = registry.build("data", "cifar10", root=str(tmp_path), batch_size=20, task="density")
    assert (dm.dims, dm.num_classes, dm.data_kind) == ((3, 32, 32), 10, "image")
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 4            # val_split=0: test set
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.min() >= 0 and x.max() < 1
    assert torch.equal(torch.floor(x * 256).long(), ref["test_batch"][0].long())
    # training order is shuffled: compare as the dataset sees it
    xs, ys = zip(*(dm.train_set[i] for i in range(20)))
    images = torch.cat([ref[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = torch.cat([ref[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert torch.equal(torch.floor(torch.stack(xs) * 256).long(), images.long())
    assert torch.equal(torch.tensor(ys), labels)


def test_cifar10_classification_augments_train_only(tmp_path, no_md5):
    ref = _make_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), task="classification", batch_size=4, val_split=4)
    dm.setup("fit")
    assert len(dm.train_set) == 16 and len(dm.val_set) == 4
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    images = torch.cat([ref[f"data_batch_{i}"][0] for i in range(1, 6)]).float() / 255
    i = dm.val_set.indices[0]
    v, _ = dm.val_set[0]
    assert torch.allclose(v, (images[i] - mean) / std, atol=1e-5)      # val: no augmentation
    j = dm.train_set.indices[0]
    plain = (images[j] - mean) / std
    outs = [dm.train_set[0][0] for _ in range(12)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.allclose(o, plain, atol=1e-5) for o in outs)  # crop/flip happened


def test_cifar100_fine_labels(tmp_path, no_md5):
    ref = _make_cifar(tmp_path, hundred=True)
    dm = registry.build("data", "cifar100", root=str(tmp_path), batch_size=4, task="classification")
    assert dm.num_classes == 100
    dm.setup("test")
    _, y = next(iter(dm.test_dataloader()))
    assert torch.equal(y, ref["test"][1])


def test_cifar_files_are_md5_checked_and_reported(tmp_path):
    _make_cifar(tmp_path)            # real layout, but not the official bytes
    with pytest.raises(FileNotFoundError, match="MD5 mismatch") as info:
        CIFAR10DataModule(root=str(tmp_path)).setup("fit")
    assert "data_batch_1" in str(info.value)


@pytest.mark.parametrize("cls, folder, files", [
    (CIFAR10DataModule, "cifar-10-batches-py",
     ["data_batch_1", "data_batch_5", "test_batch", "batches.meta", "cifar-10-python.tar.gz"]),
    (CIFAR100DataModule, "cifar-100-python", ["train", "test", "meta", "cifar-100-python.tar.gz"]),
])
def test_cifar_missing_files_message(tmp_path, cls, folder, files):
    with pytest.raises(FileNotFoundError) as info:
        cls(root=str(tmp_path)).setup("test")
    msg = str(info.value)
    assert os.path.join(str(tmp_path), folder) in msg and "data.download=true" in msg
    for name in files:
        assert name in msg


# --------------------------------------------------------------------------- FakeData
@pytest.mark.parametrize("task", ["density", "classification"])
def test_fake_datamodule(task):
    dm = registry.build("data", "fake", image_size=(3, 8, 8), num_classes=4, size=24, val_size=8,
                        test_size=8, batch_size=8, task=task)
    assert dm.dims == (3, 8, 8) and dm.num_classes == 4 and dm.data_kind == "image"
    assert dm.dequantized == (task == "density")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 8, 8) and y.shape == (8,) and y.max() < 4 and torch.isfinite(x).all()
    if task == "density":
        assert x.min() >= 0 and x.max() < 1
    else:
        assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6 and x.min() < 0
    v = torch.cat([b for b, _ in dm.val_dataloader()])
    assert torch.equal(v, torch.cat([b for b, _ in dm.val_dataloader()]))  # fixed evaluation data
    t = torch.cat([b for b, _ in dm.test_dataloader()])
    assert v.shape == t.shape == (8, 3, 8, 8) and not torch.equal(v, t)


def test_bits_per_dim_convention():
    # uniform density on [0,1]^D: log p = 0 -> exactly 8 bits per dimension
    assert torch.allclose(bits_per_dim(torch.zeros(3), 784), torch.full((3,), 8.0))
    # a density twice as high everywhere saves one bit per image, 1/D per dimension
    assert torch.allclose(bits_per_dim(torch.tensor([784 * math.log(2.0)]), 784), torch.tensor([7.0]))
