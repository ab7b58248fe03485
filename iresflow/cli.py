"""The ``iresflow`` command: ``train``, ``eval``, ``sample``, ``sweep``, ``registry list``, ``config show``.

Python API: :func:`train` (a config in, final metrics out), :func:`evaluate`,
:func:`sample`, and :func:`main` (the command line, returns the exit code).

Every run writes into its ``output_dir``:
``config.yaml`` (resolved), ``metrics.json`` (final train/val/test metrics,
flat name -> float), ``checkpoints/last.ckpt`` (+ the best one), pictures
(PNG) and the logger's files (``wandb/`` or ``csv/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from iresflow import wandb_env
from iresflow.config import ConfigError, apply_overrides, load_config, to_yaml

__all__ = ["train", "evaluate", "sample", "main", "RunDirError", "resolve_output_dir", "build_components",
           "build_strategy"]

RUNS_ROOT = "runs"
RUN_DIR_ENV = "IRESFLOW_RUN_DIR"  # lets DDP child processes find the run folder rank 0 chose
WANDB_ID_FILE = "wandb_run_id.txt"


class RunDirError(RuntimeError):
    """A run folder that cannot be used (not empty, or nothing to resume)."""


# --------------------------------------------------------------------------- helpers

def _rank() -> int:
    """This process's global rank, from the launcher's environment, before any process group exists.

    torchrun sets ``RANK``, SLURM ``SLURM_PROCID``; Lightning's own launcher
    (``strategy=ddp``) only ``LOCAL_RANK`` and ``NODE_RANK``, so on node 1 local rank
    0 is not global rank 0 (only rank 0 writes the run's files).
    """
    for var in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local, node = os.environ.get("LOCAL_RANK", ""), os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", ""))
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "")
    return (int(local) if local.isdigit() else 0) + \
        (int(node) if node.isdigit() else 0) * (int(per_node) if per_node.isdigit() else 1)


def run_name(cfg: DictConfig) -> str:
    return str(cfg.get("name") or cfg.get("experiment") or f"{cfg.data.name}_{cfg.task.name}")


def _latest_run(name: str) -> Path | None:
    root = Path(RUNS_ROOT) / name
    runs = [p for p in root.glob("*") if (p / "checkpoints" / "last.ckpt").is_file()] if root.is_dir() else []
    return max(runs, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime) if runs else None


def resolve_output_dir(cfg: DictConfig) -> tuple[Path, str | None]:
    """The run folder and the checkpoint to resume from (None: a fresh run).

    - ``output_dir`` set: that folder; ``ckpt_path=last`` resumes its last.ckpt;
    - ``ckpt_path=<file>`` without ``output_dir``: the run folder the file belongs to;
    - ``ckpt_path=last`` without ``output_dir``: the newest ``runs/<name>/*`` with a last.ckpt;
    - otherwise ``runs/<name>/<timestamp>``.
    A fresh run refuses a non-empty folder unless ``overwrite=true``.
    """
    ckpt = cfg.get("ckpt_path")
    rank = _rank()
    if cfg.get("output_dir"):
        out = Path(str(cfg.output_dir))
    elif rank > 0 and os.environ.get(RUN_DIR_ENV):
        out = Path(os.environ[RUN_DIR_ENV])
    elif ckpt == "last":
        found = _latest_run(run_name(cfg))
        if found is None:
            raise RunDirError(f"ckpt_path=last: no run of {run_name(cfg)!r} with checkpoints/last.ckpt under "
                              f"{Path(RUNS_ROOT) / run_name(cfg)}; pass output_dir=<the run folder>")
        out = found
    elif ckpt:
        p = Path(str(ckpt))
        out = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    else:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out = Path(RUNS_ROOT) / run_name(cfg) / stamp
        k = 1
        while out.exists() and rank == 0:  # two runs started in the same second
            out = Path(RUNS_ROOT) / run_name(cfg) / f"{stamp}_{k}"
            k += 1

    resume: str | None = None
    if ckpt == "last":
        last = out / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise RunDirError(f"ckpt_path=last: {last} does not exist; nothing to resume in {out}")
        resume = str(last)
    elif ckpt:
        if not Path(str(ckpt)).is_file():
            raise RunDirError(f"ckpt_path={ckpt}: no such checkpoint file")
        resume = str(ckpt)

    if rank == 0 and resume is None and out.exists() and any(out.iterdir()):
        if cfg.get("overwrite"):
            shutil.rmtree(out)
        else:
            held = ", ".join(sorted(p.name for p in out.iterdir())[:6])
            raise RunDirError(
                f"output_dir {out} is not empty (holds {held}); refusing to overwrite a run's results. "
                "Resume it with ckpt_path=last, choose another output_dir, or pass overwrite=true.")
    return out, resume


def _node(cfg_node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg_node, resolve=True) if isinstance(cfg_node, DictConfig) else dict(cfg_node)


def build_components(cfg: DictConfig, check_data: str | None = None):
    """Datamodule, model and task from a config (plugins discovered first).

    ``check_data`` ("fit" / "test"): set the datamodule up right away, so that
    missing files are reported before a model is built or a logger started.
    """
    from iresflow import registry
    from iresflow.tasks.base import task_parameters

    registry.discover(list(cfg.get("plugins") or []))
    try:
        dm = registry.build_node("data", _node(cfg.data), task=cfg.task.name)
        if check_data:
            if _rank() == 0 and hasattr(dm, "prepare_data"):
                dm.prepare_data()
            dm.setup(check_data)
        dims = tuple(getattr(dm, "dims", ()) or ())
        data_kind = getattr(dm, "data_kind", "vector")
        num_classes = getattr(dm, "num_classes", None)
        model_defaults: dict[str, Any] = {"in_shape": dims}
        if num_classes:
            model_defaults["num_classes"] = num_classes
        model = registry.build_node("model", _node(cfg.model), **model_defaults)

        task_node = _node(cfg.task)
        entry = registry.get("task", task_node["name"])
        accepted = task_parameters(entry.obj) if isinstance(entry.obj, type) else None
        if accepted is not None:
            for key in task_node:
                if key != "name" and key not in accepted:
                    import difflib

                    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise registry.RegistryError(
                        f"task {task_node['name']!r} has no parameter {key!r}{hint}. "
                        f"Accepted: {', '.join(a for a in accepted if a != 'model')}.")
        defaults = {"model": model, "dims": dims, "data_kind": data_kind,
                    "n_bits": getattr(dm, "n_bits", None), "num_classes": num_classes}
        name = task_node.pop("name")
        params = {k: v for k, v in defaults.items() if accepted is None or k in accepted}
        params.update(task_node)
        task = registry.build("task", name, **params)
    except registry.RegistryError as err:
        raise ConfigError(str(err)) from err
    return dm, model, task


def build_logger(cfg: DictConfig, out: Path, resuming: bool):
    node = _node(cfg.logger)
    kind = node.pop("name")
    if kind in ("none", None, False):
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name="csv")
    if kind != "wandb":
        raise ConfigError(f"unknown logger {kind!r}; choose wandb, csv or none")
    from lightning.pytorch.loggers import WandbLogger

    try:
        mode = wandb_env.resolve_mode(node.pop("mode", "auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    id_file = out / WANDB_ID_FILE
    if resuming and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        import secrets
        import string

        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")
    import wandb

    settings = wandb.Settings(init_timeout=30, silent=True)
    return WandbLogger(
        name=f"{run_name(cfg)}-{out.name}", project=node.pop("project", "iresflow"),
        entity=node.pop("entity", None), group=node.pop("group", None), tags=list(node.pop("tags", []) or []),
        job_type=node.pop("job_type", "train"), log_model=node.pop("log_model", False),
        save_dir=str(out), id=run_id, resume="allow", mode=mode, offline=mode == "offline", settings=settings,
        config=OmegaConf.to_container(cfg, resolve=True), **node)


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    import inspect

    from lightning.pytorch import Trainer

    kwargs = {k: v for k, v in _node(cfg.trainer).items()}
    accepted = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    for key in kwargs:
        if key not in accepted:
            import difflib

            close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.5)
            hint = f" (did you mean trainer.{close[0]}?)" if close else ""
            raise ConfigError(f"trainer.{key} is not a lightning Trainer argument{hint}")
    for key in ("logger", "callbacks", "default_root_dir"):
        if key in kwargs:
            raise ConfigError(f"trainer.{key} is set by iresflow; use the logger group / output_dir instead")
    if isinstance(kwargs.get("strategy"), dict):
        kwargs["strategy"] = build_strategy(kwargs["strategy"])
    if kwargs.get("sync_batchnorm") and not _gpu_accelerator(kwargs.get("accelerator", "auto")):
        # torch's SyncBatchNorm runs on GPUs only; on CPU every process keeps its own batch statistics
        kwargs["sync_batchnorm"] = False
    # validation and test need autograd (Hutchinson vector-Jacobian products): no inference mode
    kwargs["inference_mode"] = False
    return kwargs


def _gpu_accelerator(accelerator: Any) -> bool:
    """Whether ``trainer.accelerator`` means CUDA devices (``auto``: when there are some)."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda"):
        return True
    if name == "auto":
        import torch

        return torch.cuda.is_available()
    return False


#: DDP strategy names and the way Lightning starts their processes
DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


def build_strategy(node: dict[str, Any]):
    """A strategy node of the trainer config -> a Lightning strategy.

    ``{name: ddp, find_unused_parameters: false, timeout: 1800, ...}``: a
    ``DDPStrategy`` (``ddp`` / ``ddp_spawn`` / ``ddp_fork``) whose other keys go to
    it and on to ``torch.nn.parallel.DistributedDataParallel``
    (``find_unused_parameters``, ``static_graph``, ``gradient_as_bucket_view``,
    ``broadcast_buffers``, ``process_group_backend``; ``timeout`` in seconds).
    A node with only a name is that name (``{name: auto}`` -> ``"auto"``).
    """
    node = dict(node)
    name = node.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("trainer.strategy as a mapping needs a name "
                          "(e.g. {name: ddp, find_unused_parameters: false})")
    if not node:
        return name
    if name not in DDP_START_METHODS:
        raise ConfigError(f"trainer.strategy: settings are supported for {', '.join(DDP_START_METHODS)}, "
                          f"not {name!r}; pass trainer.strategy={name} alone")
    import difflib
    import inspect
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    accepted = ({"process_group_backend", "timeout", "model_averaging_period"}
                | set(inspect.signature(DistributedDataParallel.__init__).parameters)) \
        - {"self", "module", "device_ids", "output_device", "process_group", "device_mesh"}
    for key in node:
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"trainer.strategy.{key} is not a DDP setting{hint}; accepted: "
                              f"{', '.join(sorted(accepted))}")
    if node.get("timeout") is not None:
        node["timeout"] = timedelta(seconds=float(node["timeout"]))
    try:
        return DDPStrategy(start_method=DDP_START_METHODS[name], **node)
    except TypeError as err:
        raise ConfigError(f"trainer.strategy: {err}") from err


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            if hasattr(value, "numel") and value.numel() != 1:
                continue
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    def clean(v):
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)

    path.write_text(json.dumps({k: clean(v) for k, v in data.items()}, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- train

def train(cfg: DictConfig | Sequence[str] | None = None) -> dict[str, float]:
    """Train (or resume) one run; returns the final metrics (also in ``metrics.json``).

    ``cfg`` is a composed config (:func:`iresflow.config.load_config`) or a list
    of overrides.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    if cfg is None or not isinstance(cfg, DictConfig):
        cfg = load_config(list(cfg or []))
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # a private copy
    out, resume = resolve_output_dir(cfg)
    cfg.output_dir = str(out)
    rank = _rank()
    if rank == 0:
        os.environ[RUN_DIR_ENV] = str(out.resolve())
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm, model, task = build_components(cfg, check_data="fit")
    _set_threads(cfg, dm)
    task.run_config = OmegaConf.to_container(cfg, resolve=True)

    logger = build_logger(cfg, out, resuming=resume is not None)
    ckpt_dir = out / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=task.monitor,
                                 mode=task.monitor_mode, save_top_k=1, save_last=True,
                                 auto_insert_metric_name=False)
    callbacks: list[Any] = [checkpoint]
    if logger is not False:
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = pl.Trainer(**_trainer_kwargs(cfg), logger=logger, callbacks=callbacks,
                         default_root_dir=str(out))

    start = time.perf_counter()
    with warnings.catch_warnings():
        # toy/fake data: few workers on purpose; Lightning's hints are noise here
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
        trainer.fit(task, datamodule=dm, ckpt_path=resume)
        fit_seconds = time.perf_counter() - start
        if trainer.interrupted:
            raise KeyboardInterrupt("training interrupted")
        trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))  # the final state, whatever the schedule
        metrics = _flat_metrics(trainer.callback_metrics)
        if _has_test(dm):
            trainer.test(task, datamodule=dm, verbose=False)
            metrics.update(_flat_metrics(trainer.callback_metrics))
    metrics = {k: v for k, v in metrics.items() if not k.endswith("_step")}
    metrics["trainer/global_step"] = float(trainer.global_step)
    metrics["trainer/epoch"] = float(trainer.current_epoch)
    metrics["time/fit_seconds"] = fit_seconds
    if trainer.is_global_zero:
        _write_json(out / "metrics.json", metrics)
        if logger is not False and hasattr(logger, "experiment"):
            try:
                for key in ("test/nll", "test/bpd", "test/acc"):
                    if key in metrics and hasattr(logger.experiment, "summary"):
                        logger.experiment.summary[key] = metrics[key]
            except Exception:
                pass
    if logger is not False and hasattr(logger, "finalize"):
        logger.finalize("success")
    if logger is not False and type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
        import wandb

        wandb.finish()
    train.last_pictures = list(task.picture_paths)  # type: ignore[attr-defined]
    train.last_output_dir = out  # type: ignore[attr-defined]
    return metrics


def _has_test(dm) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("test_dataloader", dm)


# --------------------------------------------------------------------------- eval / sample

def _load_checkpoint(ckpt: str | os.PathLike[str]):
    import torch

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    raw = state.get("iresflow_config")
    if raw is None:
        run_cfg = (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / "config.yaml"
        if not run_cfg.is_file():
            raise ConfigError(f"{path} holds no iresflow config and there is no {run_cfg}")
        cfg = OmegaConf.load(run_cfg)
    else:
        cfg = OmegaConf.create(raw)
    return state, cfg


def _restore(ckpt: str, overrides: Sequence[str]):
    state, cfg = _load_checkpoint(ckpt)
    apply_overrides(cfg, overrides)
    dm, model, task = build_components(cfg)
    missing, unexpected = task.load_state_dict(state["state_dict"], strict=False)
    problems = [k for k in missing if "_metrics" not in k] + [k for k in unexpected if "_metrics" not in k]
    if problems:
        raise RuntimeError(f"checkpoint {ckpt} does not fit the model built from its config: "
                           f"{', '.join(problems[:8])}")
    task.run_config = OmegaConf.to_container(cfg, resolve=True)
    return cfg, dm, task


def _run_dir_of(ckpt: str) -> Path:
    p = Path(ckpt)
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def _set_threads(cfg: DictConfig, dm: Any) -> None:
    """``threads``: torch's CPU threads. ``auto``: one for vector (toy) data, whose
    matrices are too small to gain from more (a second thread costs more in
    synchronisation than it saves: measured 3-10x slower steps on a busy 2-core
    machine), torch's default (one per core) otherwise."""
    import torch

    threads = cfg.get("threads", "auto")
    if threads in (None, "default"):
        return
    if threads == "auto":
        if getattr(dm, "data_kind", None) != "vector":
            return
        threads = 1
    torch.set_num_threads(int(threads))


def evaluate(ckpt: str, overrides: Sequence[str] = (), out: str | None = None) -> dict[str, float]:
    """Test metrics of a checkpoint (bits/dim with the evaluation estimator, accuracy,
    reconstruction error), written to ``out`` (default ``<run>/eval_<ckpt>.json``)."""
    import lightning.pytorch as pl

    cfg, dm, task = _restore(ckpt, overrides)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    tk = _node(cfg.trainer)
    trainer = pl.Trainer(accelerator=tk.get("accelerator", "auto"), devices=1, logger=False,
                         enable_checkpointing=False, inference_mode=False,
                         enable_progress_bar=tk.get("enable_progress_bar", True),
                         limit_test_batches=tk.get("limit_test_batches"),
                         precision=tk.get("precision", "32-true"), default_root_dir=str(_run_dir_of(ckpt)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.test(task, datamodule=dm, verbose=False)
    metrics = _flat_metrics(trainer.callback_metrics)
    path = Path(out) if out else _run_dir_of(ckpt) / f"eval_{Path(ckpt).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, metrics)
    evaluate.last_path = path  # type: ignore[attr-defined]
    return metrics


def sample(ckpt: str, n: int = 64, overrides: Sequence[str] = (), out: str | None = None,
           temperature: float = 1.0, seed: int | None = None) -> Path:
    """Draw ``n`` samples through the inverse: a PNG grid (images) or scatter (2D)."""
    import torch

    from iresflow import plotting

    cfg, dm, task = _restore(ckpt, overrides)
    torch.manual_seed(int(cfg.seed if seed is None else seed))
    task.eval()
    task.update_lipschitz(getattr(task, "lipschitz_eval_iterations", 10))
    if not hasattr(task, "sample"):
        raise ConfigError(f"task {cfg.task.name!r} cannot sample; sampling needs a density model")
    x = task.sample(int(n), temperature=float(temperature)).detach().cpu()
    path = Path(out) if out else _run_dir_of(ckpt) / f"samples_n{n}.png"
    if x.dim() == 2 and x.shape[1] == 2:
        plotting.scatter_2d(x, path, title=f"{n} samples")
    elif x.dim() == 4:
        plotting.image_grid(x, path)
    else:
        raise ConfigError(f"cannot draw samples of shape {tuple(x.shape)}")
    return path


# --------------------------------------------------------------------------- command line

def _pop_keys(overrides: Sequence[str], keys: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    found, rest = {}, []
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in keys and "=" in o:
            found[key] = o.split("=", 1)[1]
        else:
            rest.append(o)
    return found, rest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iresflow", description="Invertible residual networks and residual flows on PyTorch Lightning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: group=name (data=mnist, logger=none, experiment=mnist_classify), "
               "a.b.c=value (model.coeff=0.9), +a.b=value (new key).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a model (no overrides: the 2D toy density run)", formatter_class=fmt,
                       description="Train one run. Without overrides: a 2D density (8 Gaussians), a few minutes "
                                   "on a laptop CPU, with a picture of the learned density.\n\nexamples:\n"
                                   "  iresflow train\n  iresflow train experiment=mnist_classify data.root=DIR\n"
                                   "  iresflow train model.coeff=0.9 model.estimator.name=power_series "
                                   "model.estimator.n_terms=8\n"
                                   "  iresflow train output_dir=runs/x ckpt_path=last   # resume")
    t.add_argument("overrides", nargs="*", help="group=name, a.b=value or +a.b=value")

    e = sub.add_parser("eval", help="test metrics of a checkpoint to JSON", formatter_class=fmt,
                       description="Evaluate a checkpoint on the test set (bits/dim with the evaluation "
                                   "estimator, accuracy, reconstruction error); writes JSON.\n\nexample:\n"
                                   "  iresflow eval ckpt=runs/toy2d_density/DATE/checkpoints/last.ckpt")
    e.add_argument("overrides", nargs="*", help="ckpt=PATH (required), out=FILE.json, a.b=value ...")
    e.add_argument("--ckpt", help="checkpoint file (same as ckpt=PATH)")
    e.add_argument("--out", help="JSON file to write (default <run>/eval_<ckpt>.json)")

    s = sub.add_parser("sample", help="draw samples through the inverse (PNG)", formatter_class=fmt,
                       description="Sample from a density checkpoint: a PNG grid (images) or a scatter (2D)."
                                   "\n\nexample:\n  iresflow sample ckpt=runs/.../last.ckpt n=64")
    s.add_argument("overrides", nargs="*", help="ckpt=PATH (required), n=64, out=FILE.png, temperature=1.0, "
                                                "seed=0, a.b=value ...")
    s.add_argument("--ckpt")
    s.add_argument("-n", type=int, default=None)
    s.add_argument("--out")

    r = sub.add_parser("registry", help="the registered components", formatter_class=fmt,
                       description="registry list [KIND]: every registered component with its description "
                                   "and parameters.")
    r_sub = r.add_subparsers(dest="action", metavar="ACTION")
    r_sub.required = True
    rl = r_sub.add_parser("list", help="list components (of one kind)")
    rl.add_argument("kind", nargs="?", help="activation, residual, solver, estimator, model, task, data")
    rl.add_argument("--plugins", nargs="*", default=[], help="extra plugin folders")

    c = sub.add_parser("config", help="show the composed config", formatter_class=fmt,
                       description="config show [overrides]: print the resolved config of a run.")
    c_sub = c.add_subparsers(dest="action", metavar="ACTION")
    c_sub.required = True
    cs = c_sub.add_parser("show", help="print the resolved config")
    cs.add_argument("overrides", nargs="*")

    from iresflow import sweep as _sweep

    w = sub.add_parser("sweep", help=_sweep.CLI_HELP, description=_sweep.CLI_DESCRIPTION, formatter_class=fmt)
    _sweep.add_arguments(w)
    return p


def _entry_parameters(entry) -> dict[str, str]:
    """Parameters with defaults; for classes taking ``**kwargs`` on to a base, the base's too."""
    import inspect

    params = entry.parameters()
    obj = entry.obj
    if isinstance(obj, type):
        for klass in obj.__mro__[1:]:
            init = klass.__dict__.get("__init__")
            if init is None or klass.__module__.split(".")[0] != "iresflow":
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in params:
                    params[p.name] = "required" if p.default is p.empty else repr(p.default)
    return params


def _print_registry(kind: str | None, plugins: Sequence[str]) -> None:
    from iresflow import registry

    registry.discover(plugins)
    current = None
    for entry in registry.describe(kind):
        if entry.kind != current:
            current = entry.kind
            print(f"\n[{current}]")
        print(f"  {entry.name:<22} {entry.description}")
        params = _entry_parameters(entry)
        if params:
            print("      " + ", ".join(f"{k}={v}" for k, v in params.items()))


def _cmd_train(overrides: Sequence[str]) -> int:
    cfg = load_config(overrides)
    metrics = train(cfg)
    if _rank() == 0:
        print("\nfinal metrics:")
        for key in sorted(metrics):
            print(f"  {key:<32} {metrics[key]:.6g}")
        out = Path(train.last_output_dir)  # type: ignore[attr-defined]
        pictures = getattr(train, "last_pictures", [])
        final = [p for p in pictures if p.parent == out] or pictures[-1:]
        print(f"\nrun folder: {out}")
        for p in final:
            print(f"picture: {p}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (0 on success)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from iresflow.registry import PluginImportError, RegistryError
    from iresflow.tasks.base import NonFiniteLossError

    try:
        if args.command == "train":
            return _cmd_train(args.overrides)
        if args.command == "eval":
            found, rest = _pop_keys(args.overrides, ("ckpt", "out"))
            ckpt = args.ckpt or found.get("ckpt")
            if not ckpt:
                raise ConfigError("eval needs ckpt=PATH")
            metrics = evaluate(ckpt, rest, out=args.out or found.get("out"))
            print(json.dumps(metrics, indent=2, sort_keys=True))
            print(f"written: {evaluate.last_path}")  # type: ignore[attr-defined]
            return 0
        if args.command == "sample":
            found, rest = _pop_keys(args.overrides, ("ckpt", "n", "out", "temperature", "seed"))
            ckpt = args.ckpt or found.get("ckpt")
            if not ckpt:
                raise ConfigError("sample needs ckpt=PATH")
            n = args.n if args.n is not None else int(found.get("n", 64))
            path = sample(ckpt, n, rest, out=args.out or found.get("out"),
                          temperature=float(found.get("temperature", 1.0)),
                          seed=int(found["seed"]) if "seed" in found else None)
            print(f"samples: {path}")
            return 0
        if args.command == "registry":
            _print_registry(args.kind, args.plugins)
            return 0
        if args.command == "config":
            print(to_yaml(load_config(args.overrides)), end="")
            return 0
        if args.command == "sweep":
            from iresflow import sweep as _sweep

            return _sweep.main(args)
    except (ConfigError, RegistryError, RunDirError, PluginImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = os.environ.get(RUN_DIR_ENV)
        hint = f"; resume with output_dir={where} ckpt_path=last" if where else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    return 1
