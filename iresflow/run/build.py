"""Components, logger and trainer settings from a config: built once, here.

Every component is a registered node ``{name: ..., ...params}``; the registry checks its
name and parameters and turns nested part nodes (``model.estimator``, ``task.optimizer``)
into factories. The datamodule's facts (``dims``, ``data_kind``, ``n_bits``,
``num_classes``) are offered to the model and the task as defaults: each takes those
its signature names. A value a component refuses (``coeff=1.5``, an unknown gradient mode)
is bad input, reported with the node it came from: components refuse values with a
``ValueError``. Any other error raised while building (a ``TypeError`` inside a constructor
is a bug, not a bad setting) keeps its traceback.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from iresflow import registry, wandb_env
from iresflow.config import ConfigError
from iresflow.run.paths import rank, run_name

__all__ = ["build_components", "build_logger", "trainer_kwargs", "build_strategy", "DDP_START_METHODS",
           "set_threads", "WANDB_ID_FILE"]

WANDB_ID_FILE = "wandb_run_id.txt"


def _node(cfg_node: Any) -> dict[str, Any]:
    if isinstance(cfg_node, DictConfig):
        return {str(k): v for k, v in OmegaConf.to_container(cfg_node, resolve=True).items()}  # type: ignore[union-attr]
    return dict(cfg_node)


def _build(kind: str, node: Any, **defaults: Any) -> Any:
    """``registry.build_node`` with the component's own complaints turned into bad input."""
    node = _node(node)
    try:
        return registry.build_node(kind, node, **defaults)
    except registry.RegistryError as err:
        raise ConfigError(f"{kind}: {err}") from err
    except ValueError as err:  # a value the component refuses (a TypeError is a bug: its traceback is shown)
        raise ConfigError(f"{kind} {node.get('name')!r}: {err} (check the {kind}.* settings)") from err


def build_components(cfg: DictConfig, check_data: str | None = None):
    """Datamodule, model and task from a config (plugins discovered first).

    ``check_data`` ("fit" / "test"): set the datamodule up right away, so that missing
    or damaged files are reported before a model is built or a logger started.
    """
    from iresflow.data.images import DataFileError

    registry.discover(list(cfg.get("plugins") or []))
    dm = _build("data", cfg.data, task=cfg.task.name)
    if check_data:
        try:
            if rank() == 0 and hasattr(dm, "prepare_data"):
                dm.prepare_data()
            dm.setup(check_data)
        except (FileNotFoundError, DataFileError) as err:
            raise ConfigError(str(err)) from err
    facts = {"dims": tuple(getattr(dm, "dims", ()) or ()), "data_kind": getattr(dm, "data_kind", "vector"),
             "n_bits": getattr(dm, "n_bits", None), "num_classes": getattr(dm, "num_classes", None)}
    model = _build("model", cfg.model, in_shape=facts["dims"], num_classes=facts["num_classes"])
    task = _build("task", cfg.task, model=model, **facts)
    return dm, model, task


def set_threads(cfg: DictConfig, dm: Any) -> None:
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


def build_logger(cfg: DictConfig, out: Path, resuming: bool):
    """The experiment logger (False for none). Nothing is written yet; the W&B run id is
    returned as ``logger.iresflow_run_id`` for the caller to record."""
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
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")
    import wandb

    settings = wandb.Settings(init_timeout=30, silent=True)
    logger = WandbLogger(
        name=f"{run_name(cfg)}-{out.name}", project=node.pop("project", "iresflow"),
        entity=node.pop("entity", None), group=node.pop("group", None), tags=list(node.pop("tags", []) or []),
        job_type=node.pop("job_type", "train"), log_model=node.pop("log_model", False),
        save_dir=str(out), id=run_id, resume="allow", mode=mode, offline=mode == "offline", settings=settings,
        config=OmegaConf.to_container(cfg, resolve=True), **node)
    logger.iresflow_run_id = run_id  # type: ignore[attr-defined]
    return logger


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of lightning's Trainer from ``cfg.trainer`` (names and types were
    checked with the config: :mod:`iresflow.schema`)."""
    kwargs = dict(_node(cfg.trainer))
    for key in ("logger", "callbacks", "default_root_dir", "plugins"):
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
    ``forward_sync_buffers``, ``process_group_backend``; ``timeout`` in seconds).
    ``forward_sync_buffers`` is torch >= 2.13's name for the deprecated ``broadcast_buffers``:
    either name is passed on under the one the installed torch takes.
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

    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    ddp_parameters = set(inspect.signature(DistributedDataParallel.__init__).parameters)
    new_name, old_name = "forward_sync_buffers", "broadcast_buffers"
    if new_name in node and old_name in node:
        raise ConfigError(f"trainer.strategy: set {new_name} only ({old_name} is its deprecated name)")
    if old_name in node and new_name in ddp_parameters:  # torch >= 2.13 warns about the old name
        node[new_name] = node.pop(old_name)
    elif new_name in node and new_name not in ddp_parameters:  # an older torch
        node[old_name] = node.pop(new_name)
    accepted = ({"process_group_backend", "timeout", "model_averaging_period"} | ddp_parameters) \
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
        return DDPStrategy(start_method=DDP_START_METHODS[name], **node)  # type: ignore[arg-type]
    except TypeError as err:
        raise ConfigError(f"trainer.strategy: {err}") from err
