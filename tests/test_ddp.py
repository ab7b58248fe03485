"""Data-parallel training is *correct* for these models, not only running.

Two CPU processes (gloo) trained by Lightning's DDP strategy (built from
``configs/trainer/ddp.yaml``'s strategy node) on the two halves of a fixed
global batch must end with the parameters and buffers (power-iteration ``u``,
``v``, ``sigma``; ActNorm's data-dependent initialisation) of one process
trained on the whole batch; metrics logged under DDP must equal the
full-data values; a checkpoint saved by 2 processes resumes in 1 (and one
saved by 1 process resumes in 2) exactly where an uninterrupted run would be.

Everything runs in float64 with the exact log-det (no estimator randomness)
and SGD with momentum, so the tolerance is 1e-10 (measured: ~2e-16, printed
with ``-s``).
The two workers are started like torchrun / SLURM start them (externally,
with ``LOCAL_RANK`` etc. set), so several trainers can run in one process group.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from iresflow import registry
from iresflow.config import load_config
from iresflow.data.resumable import EpochSampler
from iresflow.data.toy2d import ToyBatches, sample_toy2d
from iresflow.run.build import build_components, build_strategy
from iresflow.models.flow import ResidualFlow
from iresflow.nn.logdet import ExactLogDet
from iresflow.tasks import DensityTask

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 64
VAL_SIZE = 128
STEPS, MORE_STEPS = 3, 5
TOL = 1e-10


# --------------------------------------------------------------------------- the pieces

class _FixedBatch(LightningDataModule):
    """One fixed global batch of ``GLOBAL_BATCH`` points per epoch, cut into the ranks' halves
    by Lightning's distributed sampler (no shuffling: rank r gets points r, r + W, ...)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.train_x = sample_toy2d("8gaussians", GLOBAL_BATCH, g).double()
        self.val_x = sample_toy2d("8gaussians", VAL_SIZE, g).double()

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.train_x), batch_size=GLOBAL_BATCH // self._world(), shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.val_x), batch_size=32, shuffle=False)


class _Task(DensityTask):
    """The density task without pictures (speed); it dumps every rank's final state."""

    dump: Path | None = None
    tag: str = ""

    def make_pictures(self, tag, folder):
        return []

    def on_fit_end(self) -> None:
        super().on_fit_end()  # the final power iterations run on every rank
        if self.dump is not None:
            state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            torch.save(state, self.dump / f"{self.tag}_rank{self.global_rank}.pt")


class _SaveAtTrainEnd(Callback):
    """Save a checkpoint when training stops (every rank calls; rank 0 writes)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(str(self.path))


class _FirstStep(Callback):
    def __init__(self):
        self.first = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = trainer.global_step


def _task(dump: Path | None = None, tag: str = "") -> _Task:
    torch.manual_seed(0)
    model = ResidualFlow(in_shape=(2,), n_blocks=2, hidden=[16, 16], estimator=ExactLogDet(), actnorm=True)
    # SGD with momentum: Adam's first steps, lr * g / (|g| + eps), turn the ~1e-16 rounding
    # differences of near-zero gradient entries into ~1e-9 (measured), which says nothing about DDP
    sgd = registry.factory("optimizer", {"name": "sgd", "lr": 0.05, "momentum": 0.9})
    task = _Task(model, dims=(2,), optimizer=sgd, picture_every_n_val=0, lipschitz_iterations=1,
                 lipschitz_eval_iterations=5)
    task.dump, task.tag = dump, tag
    return task.double()


def _ddp_strategy():
    """The strategy ``trainer=ddp`` builds (find_unused_parameters false, buffers broadcast)."""
    node = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "trainer" / "ddp.yaml"))["strategy"]
    assert node["find_unused_parameters"] is False
    strategy = build_strategy(node)
    assert strategy._ddp_kwargs["find_unused_parameters"] is False
    return strategy


def _fit(world: int, out: Path, tag: str, steps: int, ckpt_in: Path | None = None,
         ckpt_out: Path | None = None, validate: bool = False) -> dict:
    task = _task(out, tag)
    callbacks: list = [_FirstStep()]
    if ckpt_out is not None:
        callbacks.append(_SaveAtTrainEnd(ckpt_out))
    def kw():  # a fresh strategy object per trainer (a trainer binds its strategy to itself)
        return dict(accelerator="cpu", devices=world, strategy=_ddp_strategy() if world > 1 else "auto")

    trainer = pl.Trainer(max_steps=steps, precision="64-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
                         default_root_dir=str(out), callbacks=callbacks, **kw())
    dm = _FixedBatch()
    trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt_in) if ckpt_in else None)
    result = {"global_step": trainer.global_step, "first_step": callbacks[0].first,
              "train_nll": float(trainer.callback_metrics["train/nll"]),
              "random_draw": float(torch.rand(()))}  # the estimators' random stream on this rank
    if validate:
        trainer = pl.Trainer(precision="64-true", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, inference_mode=False, default_root_dir=str(out), **kw())
        res = trainer.validate(task, datamodule=dm, verbose=False)[0]
        result["val_nll"] = float(res["val/nll"])
    return result


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One DDP process, started the way torchrun / srun start them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      NODE_RANK="0", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(out)
    res = _fit(world, out, "ddp3", STEPS, ckpt_out=out / "ddp3.ckpt", validate=True)
    # a checkpoint saved by one process, resumed by two
    res5 = _fit(world, out, "resumed_on_2", MORE_STEPS, ckpt_in=out / "single3.ckpt")
    (out / f"ddp_rank{rank}.json").write_text(json.dumps({"ddp3": res, "resumed_on_2": res5}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{name}.pt", map_location="cpu")


def _diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference per tensor, largest first."""
    assert a.keys() == b.keys()
    d = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a}
    return dict(sorted(d.items(), key=lambda kv: -kv[1]))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(_diffs(a, b).values())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1-process references, then the 2-process runs, then a 2-process checkpoint resumed in 1."""
    out = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    single3 = _fit(1, out, "single3", STEPS, ckpt_out=out / "single3.ckpt", validate=True)
    single5 = _fit(1, out, "single5", MORE_STEPS)
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"ddp_rank{r}.json").read_text()) for r in range(2)]
    resumed1 = _fit(1, out, "resumed_on_1", MORE_STEPS, ckpt_in=out / "ddp3.ckpt")
    print(f"\n[ddp] runs took {time.perf_counter() - start:.1f} s")
    return {"out": out, "single3": single3, "single5": single5, "ranks": ranks, "resumed1": resumed1}


# --------------------------------------------------------------------------- the tests

@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(runs):
    out = runs["out"]
    single = _load(out, "single3_rank0")
    init = {k: v.double() for k, v in _task().state_dict().items()}
    # training happened, ActNorm was initialised from data, the vectors moved
    assert _max_diff(single, init) > 1e-3
    assert all(bool(v) for k, v in single.items() if k.endswith("initialized"))
    diffs = {}
    for r in range(2):
        ddp = _load(out, f"ddp3_rank{r}")
        worst = _diffs(single, ddp)
        diffs[r] = max(worst.values())
        assert diffs[r] < TOL, list(worst.items())[:6]
    # every rank holds the same parameters *and* buffers (u, v, sigma, ActNorm)
    r0, r1 = _load(out, "ddp3_rank0"), _load(out, "ddp3_rank1")
    assert _max_diff(r0, r1) == 0.0
    buffers = [k for k in r0 if k.endswith((".u", ".v", ".sigma"))]
    assert len(buffers) == 3 * 2 * 3  # 3 normalised layers x 2 blocks x (u, v, sigma)
    print(f"\n[ddp] max |1 process - 2 processes| over {len(single)} tensors: {max(diffs.values()):.3e}")
    for res in runs["ranks"]:
        assert res["ddp3"]["global_step"] == STEPS
    # ... while the estimators' random draws (Hutchinson probes, roulette) differ between ranks
    assert runs["ranks"][0]["ddp3"]["random_draw"] != runs["ranks"][1]["ddp3"]["random_draw"]


@pytest.mark.slow
def test_metrics_are_reduced_across_ranks(runs):
    single = runs["single3"]
    for res in runs["ranks"]:
        # the logged training NLL is the global batch's, on every rank, not the rank's half
        assert res["ddp3"]["train_nll"] == pytest.approx(single["train_nll"], abs=TOL)
        # validation NLL over the ranks' shares of the set equals the NLL of the whole set
        # (torchmetrics accumulates in float32 whatever the model's precision)
        assert res["ddp3"]["val_nll"] == pytest.approx(single["val_nll"], rel=1e-6)


@pytest.mark.slow
def test_checkpoint_saved_by_two_processes_resumes_in_one(runs):
    out = runs["out"]
    res = runs["resumed1"]
    assert res["first_step"] == STEPS and res["global_step"] == MORE_STEPS
    assert _max_diff(_load(out, "single5_rank0"), _load(out, "resumed_on_1_rank0")) < TOL


@pytest.mark.slow
def test_checkpoint_saved_by_one_process_resumes_in_two(runs):
    out = runs["out"]
    reference = _load(out, "single5_rank0")
    for r, res in enumerate(runs["ranks"]):
        assert res["resumed_on_2"]["first_step"] == STEPS
        assert res["resumed_on_2"]["global_step"] == MORE_STEPS
        assert _max_diff(reference, _load(out, f"resumed_on_2_rank{r}")) < TOL


# --------------------------------------------------------------------------- no unused parameters

def _one_step_grads(overrides: list[str]) -> list[str]:
    """Names of trainable parameters without a gradient after one training step of a config."""
    cfg = load_config(overrides)
    dm, model, task = build_components(cfg, check_data="fit")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    task.trainer = trainer  # training_step reads log_every_n_steps; logging outside a loop is skipped
    batch = next(iter(dm.train_dataloader()))
    task.train()
    loss = task.training_step(batch, 0)
    loss.backward()
    return [n for n, p in task.named_parameters() if p.requires_grad and (p.grad is None)]


@pytest.mark.parametrize("overrides", [
    # the default density model: Russian roulette with Neumann gradients
    ["model.n_blocks=2", "data.batch_size=32"],
    ["model.n_blocks=2", "data.batch_size=32", "model.estimator.gradient=memory_efficient"],
    ["model.n_blocks=2", "data.batch_size=32", "model.estimator=power_series",
     "model.estimator.gradient=backprop"],
    ["model.n_blocks=2", "data.batch_size=32", "model.estimator=exact", "model.estimator.gradient=backprop"],
    # images: the multi-scale flow, and the classifier (BatchNorm head)
    ["data=fake", "model=flow_multiscale", "model.n_scales=2", "model.n_blocks=1", "model.hidden=8",
     "data.image_size=[1,8,8]", "data.batch_size=4"],
    ["data=fake", "model=classifier", "task=classification", "model.stages=[[1,8],[1,8]]",
     "model.init_pad=1", "data.image_size=[3,8,8]", "data.batch_size=4"],
], ids=["roulette-neumann", "roulette-memory-efficient", "series-backprop", "exact", "multiscale",
        "classifier"])
def test_every_parameter_gets_a_gradient(overrides, monkeypatch):
    # DDP runs with find_unused_parameters=False: a parameter without a gradient would hang it
    monkeypatch.setattr(pl.LightningModule, "log", lambda self, *a, **k: None)
    assert _one_step_grads(["logger=none", *overrides]) == []


# --------------------------------------------------------------------------- toy data per rank

def _toy_epoch(n_batches: int, rank: int = 0, world: int = 1, epoch: int = 0) -> list:
    batches = ToyBatches("moons", batch_size=8, n_batches=n_batches, seed=3)
    sampler = EpochSampler(batches, shuffle=False, seed=3, rank=rank, world_size=world)
    sampler.set_epoch(epoch)
    return [batches[key] for key in sampler]


def test_toy_stream_gives_every_rank_its_own_points():
    single = _toy_epoch(6)
    ranks = [_toy_epoch(6, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    # different points on the two ranks; together exactly the batches one process draws
    assert not torch.equal(ranks[0][0][0], ranks[1][0][0])
    together = [b for pair in zip(*ranks) for b in pair]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(together, single))
    # uneven: every rank still yields the same number of batches
    assert [len(_toy_epoch(5, rank=r, world=2)) for r in range(2)] == [3, 3]
    # and the next epoch draws new points
    assert not torch.equal(_toy_epoch(6, epoch=1)[0][0], single[0][0])


# torch >= 2.13 renamed DDP's broadcast_buffers (deprecated, it warns) to forward_sync_buffers
_SYNC_BUFFERS = ("forward_sync_buffers" if "forward_sync_buffers" in
                 __import__("inspect").signature(torch.nn.parallel.DistributedDataParallel).parameters
                 else "broadcast_buffers")


def test_ddp_trainer_configs():
    from lightning.pytorch.strategies import DDPStrategy

    from iresflow.run.build import trainer_kwargs as _trainer_kwargs

    for name in ("ddp", "multinode"):
        kw = _trainer_kwargs(load_config([f"trainer={name}", "trainer.accelerator=gpu"]))
        assert isinstance(kw["strategy"], DDPStrategy) and kw["sync_batchnorm"] is True
        assert kw["strategy"]._ddp_kwargs == {"find_unused_parameters": False, _SYNC_BUFFERS: True}
        assert kw["strategy"]._start_method == "popen"
    assert _trainer_kwargs(load_config(["trainer=multinode"]))["num_nodes"] == 2
    # torch's SyncBatchNorm is GPU-only: off for CPU processes (else the classifier cannot run)
    assert _trainer_kwargs(load_config(["trainer=ddp", "trainer.accelerator=cpu"]))["sync_batchnorm"] is False
    assert _trainer_kwargs(load_config(["trainer=ddp", "trainer.accelerator=gpu"]))["sync_batchnorm"] is True
    assert _trainer_kwargs(load_config(["trainer=ddp", "trainer.strategy=ddp_spawn"]))["strategy"] == "ddp_spawn"
    gpu = _trainer_kwargs(load_config(["trainer=gpu", "trainer.precision=bf16-mixed"]))
    assert gpu["accelerator"] == "gpu" and gpu["precision"] == "bf16-mixed"
    from iresflow.config import ConfigError

    with pytest.raises(ConfigError, match="find_unused_parameters"):
        _trainer_kwargs(load_config(["trainer=ddp", "+trainer.strategy.find_unused=true"]))


# --------------------------------------------------------------------------- the command line

@pytest.mark.slow
def test_cli_ddp_run_writes_once_and_resumes_on_one_device(tmp_path):
    """`iresflow train trainer=ddp` on 2 CPU processes: one run folder written by rank 0,
    metrics.json from the reduced metrics; the run then resumes on one device."""
    import subprocess
    import sys

    out = tmp_path / "run"
    common = ["model.n_blocks=2", "model.hidden=[16,16]", "data.batch_size=32", "data.train_size=128",
              "data.val_size=64", "data.test_size=64", "task.n_samples=100", "logger=csv",
              "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("IRESFLOW_RUN_DIR", None)
    cmd = [sys.executable, "-m", "iresflow", "train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_steps=4", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final metrics:") == 1  # printed by rank 0 only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainer/global_step"] == 4 and math.isfinite(metrics["test/nll"])
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "density.png").is_file()
    assert sorted(p.name for p in (out / "csv").iterdir()) == ["version_0"]  # one logger, rank 0's
    assert list(tmp_path.iterdir()) == [out]
    # the ranks Lightning started were part of rank 0's ownership, not refused by its lock
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "finished" and not (out / ".lock").exists()
    # on one device, for more steps: a change of settings, asked for and recorded
    proc = subprocess.run([sys.executable, "-m", "iresflow", "train", "trainer=cpu", "trainer.max_steps=6",
                           "ckpt_path=auto", "resume_changes=allow", *common], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["trainer/global_step"] == 6
    assert "trainer.devices" in (out / "changes.yaml").read_text()
    assert json.loads((out / "status.json").read_text())["attempt"] == 2


@pytest.mark.slow
def test_cli_ddp_classifier_on_cpu(tmp_path):
    """The classifier (BatchNorm head; sync_batchnorm is GPU-only and turned off on CPU) under
    `trainer=ddp` on 2 CPU processes; accuracy reduced across the ranks."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "iresflow", "train", "data=fake", "model=classifier", "task=classification",
           "model.stages=[[1,8],[1,8]]", "model.init_pad=1", "data.image_size=[3,8,8]", "data.batch_size=8",
           "data.size=64", "data.val_size=32", "data.test_size=32", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.max_steps=4", "trainer.max_epochs=-1", "trainer.check_val_every_n_epoch=1",
           "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
           f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("IRESFLOW_RUN_DIR", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainer/global_step"] == 4
    # 32 test images over 2 ranks: the reduced accuracy is a multiple of 1/32
    assert 0.0 <= metrics["test/acc"] <= 1.0 and (metrics["test/acc"] * 32) == pytest.approx(
        round(metrics["test/acc"] * 32), abs=1e-6)


@pytest.mark.slow
def test_cli_ddp_run_preempted_and_resumed_equals_an_uninterrupted_one(tmp_path_factory, tmp_path):
    """SIGTERM to the launching process of a 2-process `iresflow train trainer=ddp`: the ranks agree
    at the end of the batch, both stop at the same step, one checkpoint holds both ranks' random
    streams; resumed on 2 processes the run ends with the parameters of an uninterrupted one."""
    import os
    import signal

    from run_helpers import checkpoint_step, max_difference, run, run_args, start, steps_done, wait_for, write_plugin

    plugins = write_plugin(tmp_path_factory)
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    out, steps_file = tmp_path / "run", tmp_path / "steps.txt"
    args = run_args(plugins, out, *ddp, steps=30, delay=0.1, steps_file=steps_file)
    proc = start(args, tmp_path / "log.txt")
    wait_for(lambda: steps_done(steps_file) >= 8 or proc.poll() is not None, timeout=300, what="training")
    os.kill(proc.pid, signal.SIGTERM)
    log = (tmp_path / "log.txt").read_text
    assert proc.wait(timeout=300) == 75, log()[-3000:]
    stopped = checkpoint_step(out / "checkpoints" / "last.ckpt")
    assert 4 <= stopped < 30 and steps_done(steps_file) == 2 * stopped, (stopped, steps_done(steps_file), log())
    resumed = run([*args, "ckpt_path=auto"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = tmp_path / "reference"
    uninterrupted = run(run_args(plugins, reference, *ddp, steps=30), timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    diff = max_difference(out / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")
    print(f"\n[ddp] SIGTERM at step {stopped}; max |resumed - uninterrupted| = {diff:.3e}")
    assert diff <= 1e-7
