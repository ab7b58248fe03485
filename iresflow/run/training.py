"""``iresflow train``: start, resume or continue one run in its folder.

The order matters: every check that can refuse a run happens before anything is written,
so a start that fails leaves nothing behind that blocks its corrected rerun.

1. the folder is resolved and created (a folder that cannot be written is bad input);
2. rank 0 takes its lock (exit 73 when another live process holds it);
3. ``ckpt_path`` and the folder's contents decide: start, resume, or nothing to do;
4. a resume's settings are compared with the run's ``config.yaml``;
5. the components, the checkpoint's fit, the logger and the trainer are built;
6. only now: ``config.yaml`` (a start), ``changes.yaml`` (an allowed change), ``status.json``;
7. training, with checkpoints every few minutes and when a signal stops it;
8. the final checkpoint, the test, ``metrics.json``, ``status.json``; the lock is released.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from iresflow.config import ConfigError, load_config, to_yaml
from iresflow.run.errors import EXIT_FAILED, RunFailed, Stopped
from iresflow.run.folder import RunFolder
from iresflow.run.lock import RunLock, slurm_job_id
from iresflow.run.paths import RESUME_ENV, RUN_DIR_ENV, Start, choose_checkpoint, rank, resolve_folder
from iresflow.run.resume import describe_differences, differences

__all__ = ["TrainResult", "train", "resume_command"]

#: settings the resume command is given by the run layer, not copied from the first command
_RESUME_KEYS = ("output_dir", "ckpt_path", "overwrite")


@dataclass
class TrainResult:
    """What a finished run produced."""

    metrics: dict[str, float]
    run_dir: Path
    pictures: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    attempt: int = 1
    note: str = ""


def resume_command(overrides: Sequence[str] | None, folder: Path) -> str:
    """The one command that continues the run in ``folder`` (its own overrides, then the folder)."""
    kept = [o for o in (overrides or []) if o.lstrip("+~").split("=", 1)[0] not in _RESUME_KEYS]
    return shlex.join(["iresflow", "train", *kept, f"output_dir={folder}", "ckpt_path=auto"])


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if key.endswith("_step"):
            continue
        if hasattr(value, "numel"):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


#: metrics of the inverse; a model that is not invertible by construction may fail them
_INVERSE_METRICS = ("recon_error", "solver_converged", "solver_residual_max", "solver_iterations",
                    "solver_iterations_max")


def _failure_of(metrics: dict[str, float]) -> str | None:
    """Why the final metrics are not a result: a non-finite value, a failed inverse (unless the
    model is deliberately unconstrained, e.g. ``normalization: none``: then they are reported only)."""
    unconstrained = any(metrics.get(f"{stage}/invertible_by_construction") == 0.0 for stage in ("test", "val"))
    bad = [k for k, v in sorted(metrics.items()) if not math.isfinite(v)
           and not (unconstrained and k.rsplit("/", 1)[-1] in _INVERSE_METRICS)]
    if bad:
        return "non-finite final metrics: " + ", ".join(f"{k}={metrics[k]}" for k in bad[:6])
    if unconstrained:
        return None
    for stage in ("test", "val"):
        converged = metrics.get(f"{stage}/solver_converged")
        if converged is not None and converged < 1.0:
            return (f"the inverse did not converge: {stage}/solver_converged={converged:.3g} (share of the blocks' "
                    f"solves that reached model.solver.tol); raise model.solver.max_iter or lower model.coeff")
        if converged is not None or f"{stage}/recon_error" in metrics:
            break
    return None


@contextlib.contextmanager
def _for_other_ranks(folder: Path, checkpoint: Path | None):
    """The folder and checkpoint rank 0 chose, in the environment of the ranks Lightning starts."""
    saved = {key: os.environ.get(key) for key in (RUN_DIR_ENV, RESUME_ENV)}
    os.environ[RUN_DIR_ENV], os.environ[RESUME_ENV] = str(folder), str(checkpoint or "")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has_test(dm) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("test_dataloader", dm)


def train(cfg: DictConfig | Sequence[str] | None = None, *, command: Sequence[str] | None = None) -> TrainResult:
    """Train (or resume) one run; returns its :class:`TrainResult` (the metrics are also in
    ``metrics.json``).

    ``cfg`` is a composed config (:func:`iresflow.config.load_config`) or a list of overrides;
    ``command``: the overrides as typed, for the resume command printed when the run stops.
    Raises :class:`~iresflow.run.errors.Stopped` (a signal; resumable),
    :class:`~iresflow.run.errors.RunFailed`, ``RunFolderBusy`` or ``ConfigError``.
    """
    if cfg is None or not isinstance(cfg, DictConfig):
        command = list(cfg or []) if command is None else command
        cfg = load_config(list(cfg or []))
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # a private copy
    folder = RunFolder(resolve_folder(cfg))
    cfg.output_dir = str(folder.path)
    if rank() > 0:
        return _Run(cfg, folder, command).run_other_rank()
    folder.create()
    try:
        with RunLock(folder.path):
            return _Run(cfg, folder, command).run()
    except Stopped as stop:
        if stop.requeue_job:  # the very last step: status.json, W&B and the lock are done
            from iresflow.run.signals import requeue

            requeue(stop)
        raise


class _Run:
    """One attempt of one run (rank 0 owns the folder; other ranks only train)."""

    def __init__(self, cfg: DictConfig, folder: RunFolder, command: Sequence[str] | None):
        self.cfg, self.folder = cfg, folder
        self.resume = resume_command(command, folder.path)
        self.attempt = 1

    # ------------------------------------------------------------------ rank 0
    def run(self) -> TrainResult:
        from iresflow.run.signals import StopSignals

        try:
            # a signal while the run is checked and built (data, model, checkpoint): a start that
            # stopped before training (exit 75 with the command that starts it again), not a kill
            with StopSignals(self.folder.last_checkpoint):
                checked = self._check()
        except Stopped as stop:
            self.folder.remove_if_created()
            stopped = Stopped(stop.signum, resume=self.resume)
            if self.cfg.get("requeue", False) and stop.signum == signal.SIGUSR1:
                stopped.requeue_job = slurm_job_id()  # (the time limit's signal can come this early)
            raise stopped from None
        except BaseException:
            self.folder.remove_if_created()  # a folder this start made goes with it; another is untouched
            raise
        if isinstance(checked, TrainResult):
            return checked
        start, prepared, recorded, changes = checked
        folder = self.folder
        # every check passed: now the run's files
        if start.clear:
            folder.clear()
        if recorded is None:
            folder.write_config(to_yaml(self.cfg))
        if changes:
            folder.record_changes(self.attempt, changes)
        prepared.write_logger_files()
        folder.write_status("running", self.attempt, message=f"resume with: {self.resume}")
        try:
            with _for_other_ranks(folder.path.resolve(), start.checkpoint):
                result = prepared.fit_and_test()
        except Stopped as stop:
            message = str(stop) + (f"; requeueing SLURM job {stop.requeue_job}" if stop.requeue_job else "")
            folder.write_status("interrupted", self.attempt, message, stop.exit_code)
            raise
        except RunFailed as err:
            folder.write_metrics(err.metrics)
            folder.write_status("failed", self.attempt, str(err), EXIT_FAILED)
            raise
        except BaseException as err:
            if prepared.steps_done() == 0 and start.checkpoint is None and not folder.last_checkpoint.is_file():
                # failed before the first step: like a failed start, nothing may block the corrected rerun
                if folder.created:
                    folder.remove_if_created()
                else:
                    folder.clear()
            else:
                folder.write_status("failed", self.attempt, f"{type(err).__name__}: {err}", EXIT_FAILED)
            raise
        folder.write_metrics(result.metrics)
        folder.write_status("finished", self.attempt, "", 0)
        result.note = start.note
        return result

    def _check(self):
        """Every check that can refuse the attempt; nothing is written. Returns a TrainResult when
        there is nothing to do, else (start, prepared, recorded config, allowed changes)."""
        cfg, folder = self.cfg, self.folder
        start = choose_checkpoint(cfg, folder)
        changes: dict[str, tuple[Any, Any]] = {}
        recorded = folder.recorded_config() if start.checkpoint is not None else None
        if recorded is not None:
            changes = differences(recorded, OmegaConf.to_container(cfg, resolve=True))
            if changes and cfg.get("resume_changes", "refuse") != "allow":
                raise ConfigError(
                    f"resuming {folder.path} with other settings than its config.yaml: {describe_differences(changes)}."
                    " Resume with the settings it was started with, or pass resume_changes=allow to record "
                    f"the change in {folder.changes_file}")
            status = folder.status() or {}
            if not changes and status.get("status") == "finished" and folder.metrics_file.is_file() \
                    and start.checkpoint == folder.last_checkpoint:
                return TrainResult(json.loads(folder.metrics_file.read_text()), folder.path,
                                   checkpoint=start.checkpoint, attempt=int(status.get("attempt", 1)),
                                   note=f"{folder.path} already finished (status.json, metrics.json); nothing to do")
        self.attempt = folder.next_attempt() if start.checkpoint is not None else 1
        return start, _Prepared(self, start), recorded, changes

    def run_other_rank(self) -> TrainResult:
        """A DDP rank > 0: the folder and checkpoint rank 0 chose; it writes nothing itself."""
        chosen = os.environ.get(RESUME_ENV)
        if chosen is None:  # started by an external launcher at the same time as rank 0
            ckpt = self.cfg.get("ckpt_path")
            last = self.folder.last_checkpoint
            chosen = str(last) if ckpt in ("auto", "last") and last.is_file() else (
                "" if ckpt in (None, "auto", "last") else str(ckpt))
        return _Prepared(self, Start(Path(chosen) if chosen else None)).fit_and_test()


class _Prepared:
    """The built components, logger and trainer of one attempt, ready to fit."""

    def __init__(self, run: _Run, start: Start):
        import lightning.pytorch as pl
        from lightning.fabric.plugins.environments import SLURMEnvironment

        from iresflow.run.build import build_components, build_logger, set_threads, trainer_kwargs
        from iresflow.run.checkpointing import AtomicCheckpointIO, RandomStates, best_checkpoint, periodic_checkpoint
        from iresflow.run.clock import TrainingClock
        from iresflow.run.resume import check_checkpoint_fits, read_checkpoint
        from iresflow.run.signals import StopSignals

        self.run, self.start = run, start
        cfg, folder = run.cfg, run.folder
        self.is_rank0 = rank() == 0
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        self.dm, self.model, self.task = build_components(cfg, check_data="fit")
        set_threads(cfg, self.dm)
        self.task.run_config = OmegaConf.to_container(cfg, resolve=True)
        if start.checkpoint is not None and self.is_rank0:
            check_checkpoint_fits(read_checkpoint(start.checkpoint), start.checkpoint, self.task,
                                  self.task.run_config)
        self.logger = build_logger(cfg, folder.path, resuming=start.checkpoint is not None)
        slurm = SLURMEnvironment.detect()
        wants_requeue = bool(cfg.get("requeue", False))
        if wants_requeue and slurm_job_id() is None and self.is_rank0:
            print("requeue=true, but this is not a SLURM job (no SLURM_JOB_ID): a stop will checkpoint and exit "
                  "75 without requeueing", file=sys.stderr, flush=True)
        self.stop = StopSignals(folder.last_checkpoint, requeue=wants_requeue)
        every = cfg.get("checkpoint") or {}
        # the clock first: its batch-end hook runs before any checkpoint is written
        self.clock = TrainingClock()
        callbacks: list[Any] = [self.clock, self.stop, RandomStates(),
                                best_checkpoint(folder.checkpoint_dir, self.task.monitor, self.task.monitor_mode)]
        periodic = periodic_checkpoint(folder.checkpoint_dir, every.get("every_minutes"), every.get("every_n_steps"))
        if periodic is not None:
            callbacks.append(periodic)
        if self.logger is not False:
            from lightning.pytorch.callbacks import LearningRateMonitor

            callbacks.append(LearningRateMonitor(logging_interval="step"))
        plugins: list[Any] = [AtomicCheckpointIO()]
        if slurm:  # ranks from SLURM; requeueing is ours (iresflow.run.signals says why)
            plugins.append(SLURMEnvironment(auto_requeue=False))
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            self.trainer = pl.Trainer(**trainer_kwargs(cfg), logger=self.logger, callbacks=callbacks,
                                      plugins=plugins, default_root_dir=str(folder.path))
        except (MisconfigurationException, ValueError, TypeError, ImportError) as err:  # ImportError: an
            raise ConfigError(f"trainer: {err}") from err  # accelerator whose package is not installed

    def steps_done(self) -> int:
        return int(self.trainer.global_step)

    def write_logger_files(self) -> None:
        run_id = getattr(self.logger, "iresflow_run_id", None)
        if run_id is not None:
            from iresflow.run.build import WANDB_ID_FILE

            (self.run.folder.path / WANDB_ID_FILE).write_text(run_id + "\n")

    def fit_and_test(self) -> TrainResult:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from iresflow.nn.solvers import ConvergenceError
        from iresflow.tasks.base import NonFiniteLossError

        trainer, task, dm, folder = self.trainer, self.task, self.dm, self.run.folder
        fit_seconds = 0.0
        with self.stop, warnings.catch_warnings():
            # toy/fake data: few workers on purpose; Lightning's hints are noise here
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
            self.stop.training_started = True
            start = time.perf_counter()
            try:
                trainer.fit(task, datamodule=dm, weights_only=True,
                            ckpt_path=str(self.start.checkpoint) if self.start.checkpoint else None)
                fit_seconds = time.perf_counter() - start
                # the final state, whatever the schedule (all of it: a longer run may resume it)
                trainer.save_checkpoint(str(folder.last_checkpoint), weights_only=False)
                if self.stop.signum is not None:  # a signal the loops did not see: training had just ended
                    raise Stopped(self.stop.signum)
                metrics = flat_metrics(trainer.callback_metrics)
                if _has_test(dm):
                    trainer.test(task, datamodule=dm, verbose=False)
                    metrics.update(flat_metrics(trainer.callback_metrics))
            except (SIGTERMException, Stopped) as err:
                self._finish_logger("failed")
                signum = self.stop.signum or getattr(err, "signum", None) or 15
                saved = self.stop.saved or (folder.last_checkpoint if folder.last_checkpoint.is_file() else None)
                stopped = Stopped(signum, trainer.global_step, str(saved) if saved else None, self.run.resume)
                stopped.requeue_job = getattr(err, "requeue_job", None)
                raise stopped from None
            except BaseException as err:
                self._finish_logger("failed")
                measured = {**flat_metrics(trainer.callback_metrics),
                            "train/skipped_batches": float(task.skipped_batches),
                            "trainer/global_step": float(trainer.global_step)}
                if isinstance(err, NonFiniteLossError):  # what was measured, and why it stopped
                    raise RunFailed(str(err), measured) from err
                if isinstance(err, ConvergenceError):  # a strict solver
                    raise RunFailed(f"{err} at step {trainer.global_step} (model.solver.strict=true); raise "
                                    "model.solver.max_iter or lower model.coeff", measured) from err
                raise
        metrics["train/skipped_batches"] = float(task.skipped_batches)
        metrics["trainer/global_step"] = float(trainer.global_step)
        metrics["trainer/epoch"] = float(trainer.current_epoch)
        metrics["time/fit_seconds"] = fit_seconds
        metrics.update(self.clock.metrics())
        self._finish_logger("success", metrics)
        failure = _failure_of(metrics)
        if failure is not None:
            raise RunFailed(failure, metrics)
        return TrainResult(metrics, folder.path, pictures=list(task.picture_paths),
                           checkpoint=folder.last_checkpoint, resumed_from=self.start.checkpoint,
                           attempt=self.run.attempt)

    def _finish_logger(self, status: str, metrics: dict[str, float] | None = None) -> None:
        try:
            self._close_logger(status, metrics)
        except (ConnectionError, BrokenPipeError) as err:
            if status != "failed":  # (a finished run whose logger broke: a failure of its own)
                raise
            # A stop signal sent to the whole process group (scancel, a sweep stopping its run) also
            # stops W&B's service process: what it wrote before stays in the run's wandb/ folder, and
            # the stop must not turn into a failure because the logger cannot say goodbye.
            print(f"warning: the logger could not be closed after the stop ({type(err).__name__}: {err}); "
                  "its files hold what it wrote until then", file=sys.stderr, flush=True)

    def _close_logger(self, status: str, metrics: dict[str, float] | None) -> None:
        logger = self.logger
        if logger is False:
            return
        if metrics and self.is_rank0 and type(logger).__name__ == "WandbLogger":
            summary = logger.experiment.summary
            for key in ("test/nll", "test/bpd", "test/acc"):
                if key in metrics:
                    summary[key] = metrics[key]
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger" and self.is_rank0:
            import wandb

            wandb.finish()
