"""``iresflow eval`` and ``iresflow sample``: a checkpoint in, test metrics or pictures out.

The run's settings come from the checkpoint itself (every iresflow checkpoint carries its
resolved config) or, for a foreign one, from the run folder's ``config.yaml``; overrides
change them for this evaluation only (``data.test_size=...``, ``task.eval_estimator=exact``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from iresflow.config import ConfigError, apply_overrides
from iresflow.run.folder import write_metrics_json
from iresflow.run.paths import run_folder_of
from iresflow.run.resume import check_checkpoint_fits, read_checkpoint

__all__ = ["EvalResult", "evaluate", "sample"]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    path: Path


def restore_checkpoint(ckpt: str, overrides: Sequence[str]):
    """``(config, datamodule, task)`` of a checkpoint: its config (in the file, else its run
    folder's ``config.yaml``) with ``overrides``, built through the registry, checked to fit."""
    from iresflow.run.build import build_components

    state = read_checkpoint(ckpt)
    raw = state.get("iresflow_config")
    if raw is None:
        run_cfg = run_folder_of(ckpt) / "config.yaml"
        if not run_cfg.is_file():
            raise ConfigError(f"{ckpt} holds no iresflow config and there is no {run_cfg}")
        cfg = OmegaConf.load(run_cfg)
    else:
        cfg = OmegaConf.create(raw)
    apply_overrides(cfg, overrides)
    dm, model, task = build_components(cfg)
    task.run_config = OmegaConf.to_container(cfg, resolve=True)
    check_checkpoint_fits(state, ckpt, task, task.run_config)
    task.load_state_dict(state["state_dict"], strict=False)  # metric states aside, checked to fit above
    return cfg, dm, task


def evaluate(ckpt: str, overrides: Sequence[str] = (), out: str | None = None) -> EvalResult:
    """Test metrics of a checkpoint (bits/dim with the evaluation estimator, accuracy,
    reconstruction error), written to ``out`` (default ``<run>/eval_<ckpt>.json``)."""
    import lightning.pytorch as pl

    from iresflow.run.training import flat_metrics

    cfg, dm, task = restore_checkpoint(ckpt, overrides)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    tk: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = pl.Trainer(accelerator=tk.get("accelerator", "auto"), devices=1, logger=False,
                         enable_checkpointing=False, inference_mode=False,
                         enable_progress_bar=tk.get("enable_progress_bar", True),
                         limit_test_batches=tk.get("limit_test_batches"),
                         precision=tk.get("precision", "32-true"), default_root_dir=str(run_folder_of(ckpt)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.test(task, datamodule=dm, verbose=False)
    metrics = flat_metrics(trainer.callback_metrics)
    path = Path(out) if out else run_folder_of(ckpt) / f"eval_{Path(ckpt).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_metrics_json(path, metrics)
    return EvalResult(metrics, path)


def sample(ckpt: str, n: int = 64, overrides: Sequence[str] = (), out: str | None = None,
           temperature: float = 1.0, seed: int | None = None) -> Path:
    """Draw ``n`` samples through the inverse: a PNG grid (images) or scatter (2D)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"sample n={n!r}: the number of samples must be a whole number >= 1 (e.g. n=64)")
    if not temperature > 0:
        raise ConfigError(f"sample temperature={temperature!r}: must be > 0 (1 samples the model as trained)")
    import torch

    from iresflow import plotting

    cfg, dm, task = restore_checkpoint(ckpt, overrides)
    if not hasattr(task, "sample"):
        raise ConfigError(f"task {cfg.task.name!r} cannot sample; sampling needs a density model")
    torch.manual_seed(int(cfg.seed if seed is None else seed))
    task.eval()
    task.update_lipschitz(task.lipschitz_eval_iterations)
    x = task.sample(int(n), temperature=float(temperature)).detach().cpu()
    path = Path(out) if out else run_folder_of(ckpt) / f"samples_n{n}.png"
    if x.dim() == 2 and x.shape[1] == 2:
        plotting.scatter_2d(x, path, title=f"{n} samples")
    elif x.dim() == 4:
        plotting.image_grid(x, path)
    else:
        raise ConfigError(f"cannot draw samples of shape {tuple(x.shape)}")
    return path
