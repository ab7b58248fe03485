"""Which run folder a command uses, and which checkpoint (if any) it resumes.

- ``output_dir`` set: that folder;
- ``ckpt_path=<file>`` without ``output_dir``: the run folder the file belongs to;
- ``ckpt_path=last`` without ``output_dir``: the newest ``runs/<name>/*`` with a ``last.ckpt``;
- otherwise a new ``runs/<name>/<timestamp>``.

``ckpt_path`` then says what happens in that folder (decided by :func:`choose_checkpoint`
while the folder's lock is held): ``null`` starts a run (the folder must be empty, unless
``overwrite=true``); ``auto`` resumes ``checkpoints/last.ckpt`` when there is one and starts
afresh otherwise; ``last`` resumes it (an error when there is none); a path resumes that file.

DDP ranks > 0 (started by Lightning or by a launcher) take the folder and the checkpoint
rank 0 chose from the environment (:data:`RUN_DIR_ENV`, :data:`RESUME_ENV`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from iresflow.run.errors import RunDirError
from iresflow.run.folder import RunFolder

__all__ = ["RUNS_ROOT", "RUN_DIR_ENV", "RESUME_ENV", "rank", "run_name", "resolve_folder", "Start",
           "choose_checkpoint", "run_folder_of"]

RUNS_ROOT = "runs"
RUN_DIR_ENV = "IRESFLOW_RUN_DIR"   # lets DDP child processes find the run folder rank 0 chose
RESUME_ENV = "IRESFLOW_RESUME"     # ... and the checkpoint it resumes ("" for a fresh start)


def rank() -> int:
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


def run_folder_of(ckpt: str | os.PathLike[str]) -> Path:
    """The run folder a checkpoint file belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    p = Path(ckpt)
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def _latest_run(name: str) -> Path | None:
    root = Path(RUNS_ROOT) / name
    runs = [p for p in root.glob("*") if (p / "checkpoints" / "last.ckpt").is_file()] if root.is_dir() else []
    return max(runs, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime) if runs else None


def resolve_folder(cfg: DictConfig) -> Path:
    """The run folder of ``cfg`` (nothing is created here)."""
    ckpt = cfg.get("ckpt_path")
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    if rank() > 0 and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if ckpt == "auto":
        raise RunDirError("ckpt_path=auto needs output_dir=<the run folder> (it resumes that folder's "
                          "checkpoints/last.ckpt, or starts the run there)")
    if ckpt == "last":
        found = _latest_run(run_name(cfg))
        if found is None:
            raise RunDirError(f"ckpt_path=last: no run of {run_name(cfg)!r} with checkpoints/last.ckpt under "
                              f"{Path(RUNS_ROOT) / run_name(cfg)}; pass output_dir=<the run folder>")
        return found
    if ckpt:
        return run_folder_of(str(ckpt))
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(RUNS_ROOT) / run_name(cfg) / stamp
    k = 1
    while out.exists():  # two runs started in the same second
        out = Path(RUNS_ROOT) / run_name(cfg) / f"{stamp}_{k}"
        k += 1
    return out


@dataclass(frozen=True)
class Start:
    """What a train command does in its folder: resume ``checkpoint`` (None: start the run),
    after ``clear`` (the folder's old contents go first: ``overwrite=true``, or an attempt
    that stopped before its first checkpoint)."""

    checkpoint: Path | None
    clear: bool = False
    note: str = ""


def choose_checkpoint(cfg: DictConfig, folder: RunFolder) -> Start:
    """Decide, from ``ckpt_path`` and the folder's contents, how the run starts (rank 0, lock held)."""
    ckpt = cfg.get("ckpt_path")
    last = folder.last_checkpoint
    if ckpt == "last":
        if not last.is_file():
            raise RunDirError(f"ckpt_path=last: {last} does not exist; nothing to resume in {folder.path} "
                              "(ckpt_path=auto starts the run when there is no checkpoint)")
        return Start(last)
    if ckpt == "auto":
        if last.is_file():
            return Start(last)
        if folder.is_empty():
            return Start(None)
        if folder.is_unfinished_attempt():
            return Start(None, clear=True, note=f"{folder.path} holds no checkpoint (an earlier attempt stopped "
                                                "before its first one): starting the run afresh there")
        raise RunDirError(f"ckpt_path=auto: {folder.path} holds no checkpoints/last.ckpt but is not empty "
                          f"({folder.listing()}); it is not a run to resume: choose another output_dir, or pass "
                          "overwrite=true with ckpt_path=null to replace its contents")
    if ckpt:
        path = Path(str(ckpt))
        if not path.is_file():
            raise RunDirError(f"ckpt_path={ckpt}: the checkpoint does not exist")
        if run_folder_of(path).resolve() != folder.path.resolve() and not folder.is_empty() \
                and not folder.config_file.is_file():
            raise RunDirError(f"output_dir {folder.path} is not empty ({folder.listing()}); a run started from "
                              f"{path} needs an empty folder")
        return Start(path)
    if not folder.is_empty():
        if cfg.get("overwrite"):
            return Start(None, clear=True)
        raise RunDirError(
            f"output_dir {folder.path} is not empty (holds {folder.listing()}); refusing to overwrite a run's "
            "results. Resume it with ckpt_path=auto, choose another output_dir, or pass overwrite=true.")
    return Start(None)
