"""What every reproduction shares: settings, training runs, loading them, the results files.

A target (one module of this package) gets a :class:`Context`: its results folder, the scale's
settings from ``configs/reproduce/<target>.yaml``, the seed and the user's overrides. It trains
through the ordinary run machinery -- a ``python -m iresflow train`` (or ``sweep``) process per
run, writing an ordinary run folder under ``<out>/runs/`` -- so every run resumes and is skipped
once its ``metrics.json`` exists. It then writes ``<target>.png``, ``<target>.md`` and
``<target>.json`` (every number, the settings, the wall times). A rerun with the same settings
finds the table up to date and does nothing (``--fresh`` redoes the analysis; finished runs are
still reused).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import yaml

from iresflow.files import read_json

__all__ = ["SCALES", "ReproduceError", "Context", "load_run", "read_json", "repo_path", "scale_file"]

SCALES = ("tiny", "cpu", "paper")
#: the runs write to log files: no progress bars (thousands of carriage returns) and no model summary
QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")


class ReproduceError(RuntimeError):
    """A reproduction that cannot go on: ``exit_code`` 2 for bad input, 1 for a failed run."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def repo_path(*parts: str) -> Path:
    """A path in a folder that ships with iresflow (``sweeps/...``, ``configs/...``): the checkout's, or the
    installed package's (:mod:`iresflow.resources`)."""
    from iresflow.resources import shipped_folder

    return shipped_folder(parts[0]).joinpath(*parts[1:])


def scale_file(target: str) -> Path:
    from iresflow.config import config_dir

    return config_dir() / "reproduce" / f"{target}.yaml"




def _clean(value: Any) -> Any:
    """JSON-safe numbers (a non-finite float is written as the string 'nan' / 'inf')."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _error_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.lower().startswith(("error", "traceback")) or "Error:" in line:
            return line
    return lines[-1] if lines else ""


@dataclass
class Context:
    """One target's run: where its files go and with which settings."""

    target: str
    scale: str = "cpu"
    out: Path = Path("results")
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    fresh: bool = False
    python: str = sys.executable
    spec: dict[str, Any] = field(default_factory=dict)      # the whole configs/reproduce/<target>.yaml
    settings: dict[str, Any] = field(default_factory=dict)  # its section for this scale
    run_times: dict[str, float] = field(default_factory=dict)
    run_dirs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ReproduceError(f"unknown scale {self.scale!r}; choose one of {', '.join(SCALES)}", 2)
        path = scale_file(self.target)
        if not path.is_file():
            raise ReproduceError(f"no settings file {path} for the target {self.target!r}", 2)
        self.spec = yaml.safe_load(path.read_text()) or {}
        scales = self.spec.get("scales") or {}
        if self.scale not in scales:
            raise ReproduceError(f"{path} has no {self.scale!r} scale", 2)
        self.settings = dict(scales[self.scale] or {})
        self.out = Path(self.out)
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """Everything that decides the results: a rerun with another one redoes the analysis."""
        what = {"target": self.target, "scale": self.scale, "seed": self.seed, "overrides": self.overrides,
                "spec": self.spec}
        return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def result_json(self) -> Path:
        return self.out / f"{self.target}.json"

    def up_to_date(self) -> bool:
        """The table and picture exist and were made with these settings."""
        done = read_json(self.result_json)
        figure = self.out / str(done.get("figure", ""))
        return (not self.fresh and done.get("fingerprint") == self.fingerprint() and figure.is_file()
                and (self.out / f"{self.target}.md").is_file())

    def say(self, text: str) -> None:
        print(f"[{self.target}] {text}", flush=True)

    # ------------------------------------------------------------------ training
    def run_names(self) -> list[str]:
        """The runs of this target at this scale (``only`` limits them)."""
        names = list((self.spec.get("runs") or {}).keys())
        only = self.settings.get("only")
        return [n for n in names if n in only] if only else names

    def label(self, name: str) -> str:
        return str((self.spec.get("runs") or {}).get(name, {}).get("label", name))

    def run_command(self, run: str, extra: Sequence[str] = ()) -> tuple[str, list[str]]:
        """``(experiment, overrides)`` of the run ``run`` of the settings file: the scale's settings for
        every run, the run's definition, the scale's settings for this run, ``extra`` (e.g. the 2D
        density), then the user's overrides (which win)."""
        node = (self.spec.get("runs") or {})[run]
        experiment, overrides = node["experiment"], list(node.get("overrides") or [])
        per_run = (self.settings.get("runs") or {}).get(run) or []
        if isinstance(per_run, dict):
            experiment = per_run.get("experiment", experiment)
            per_run = per_run.get("overrides") or []
        return experiment, [*(self.settings.get("train") or []), *overrides, *per_run, *extra, *self.overrides]

    def run_dir(self, name: str) -> Path:
        """The folder of a run (or sweep) trained by this context (see :meth:`train`)."""
        return self.run_dirs[name]

    def _folder(self, name: str, args: Sequence[str]) -> Path:
        """``<out>/runs/<name>_<hash of the arguments>``: the same settings find the same folder (and
        resume or skip it), other settings never reuse it."""
        digest = hashlib.sha1(json.dumps(list(args)).encode()).hexdigest()[:8]
        folder = self.out / "runs" / f"{name}_{digest}"
        self.run_dirs[name] = folder
        return folder

    def train(self, run: str, *, name: str | None = None, extra: Sequence[str] = ()) -> dict[str, float]:
        """Train the run ``run`` of the settings file (``name``: its folder's name, default ``run``), or
        find it trained, or resume it; returns its final metrics."""
        name = name or run
        experiment, overrides = self.run_command(run, extra)
        args = [f"experiment={experiment}", "logger=none", f"seed={self.seed}", *QUIET, *overrides]
        run_dir = self._folder(name, args)
        return self._process(name, "train", [*args, f"output_dir={run_dir}"], run_dir / "metrics.json", run_dir,
                             skip_if_done=True)

    def train_equal_compute(self, run: str, metrics: dict[str, float], budget_cpu_s: float, *, name: str,
                            extra: Sequence[str] = ()) -> tuple[dict[str, float], int]:
        """The run ``run`` again, for as many steps as fit the training CPU seconds ``budget_cpu_s``
        (``metrics``: its run at the scale's steps, which measured its CPU seconds per step); the
        run that already spent the budget is its own equal-compute run. Returns (metrics, steps)."""
        steps = int(metrics["trainer/global_step"])
        spent = float(metrics.get("time/train_cpu_seconds") or 0.0)
        if spent <= 0 or budget_cpu_s <= spent * 1.05:  # (within 5%: the same compute)
            return metrics, steps
        more = int(round(steps * budget_cpu_s / spent))
        return self.train(run, name=f"{name}-equal-compute", extra=[*extra, f"trainer.max_steps={more}"]), more

    def sweep(self, name: str, spec: Path, overrides: Sequence[str]) -> Path:
        """Run the sweep ``spec`` through ``python -m iresflow sweep`` into its folder. It always
        starts: the sweep itself skips its finished runs and resumes cut-off ones."""
        args = ["logger=none", f"seed={self.seed}", *QUIET, *overrides]
        folder = self._folder(name, [Path(spec).name, *args])  # (not the absolute path: the repo may move)
        self._process(name, "sweep", [str(spec), *args, "--out", str(folder)], folder / "summary.md", None,
                      skip_if_done=False)
        return folder

    def _process(self, name: str, command: str, args: list[str], done: Path, run_dir: Path | None,
                 skip_if_done: bool) -> dict:
        log_dir = self.out / "logs"
        log_name = self.run_dirs[name].name
        record = log_dir / f"{log_name}.json"
        if skip_if_done and done.is_file():
            self.run_times[name] = float(read_json(record).get("wall_time_s") or 0.0)
            self.say(f"{name}: done, skipped ({done})")
            return read_json(done) if done.suffix == ".json" else {}
        if run_dir is not None:
            args.append("ckpt_path=auto")  # cut off earlier: continue from its checkpoint, else start
        log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "iresflow", command, *args]
        log_file = log_dir / f"{log_name}.log"
        self.say(f"{name}: {command} ... (log: {log_file})")
        start = time.perf_counter()
        with open(log_file, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            returncode = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - start
        self.run_times[name] = wall
        record.write_text(json.dumps({"command": cmd, "returncode": returncode, "wall_time_s": wall,
                                      "finished_at": datetime.now().isoformat(timespec="seconds")}, indent=2))
        if returncode == 130:
            raise KeyboardInterrupt(f"{name} interrupted; run the same command again to resume it")
        if returncode != 0 or not done.is_file():
            raise ReproduceError(f"{command} {name} failed (exit {returncode}): {_error_line(log_file)} "
                                 f"[log: {log_file}]", 2 if returncode == 2 else 1)
        self.say(f"{name}: finished in {wall:.0f} s")
        return read_json(done) if done.suffix == ".json" else {}

    # ------------------------------------------------------------------ results
    def write(self, *, title: str, question: str, columns: list[tuple[str, str]], rows: list[dict[str, Any]],
              figure: Path, paper: dict[str, Any] | None = None, notes: Sequence[str] = (),
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``<target>.json`` (everything) and ``<target>.md`` (the table, the paper's, the settings)."""
        import torch

        analysis = time.perf_counter() - self.started
        result = {
            "target": self.target, "title": title, "question": question, "scale": self.scale, "seed": self.seed,
            "overrides": self.overrides, "settings": self.spec, "fingerprint": self.fingerprint(),
            "columns": [list(c) for c in columns], "rows": rows, "paper": paper, "notes": list(notes),
            "figure": Path(figure).name, "extra": extra or {},
            "wall_time_s": analysis,
            "run_wall_time_s": dict(self.run_times),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "machine": platform.machine(), "threads": torch.get_num_threads()},
            "created": datetime.now().isoformat(timespec="seconds"),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        self.result_json.write_text(json.dumps(_clean(result), indent=2) + "\n")
        md = [f"# {title}", "", question, "", f"![{self.target}]({Path(figure).name})", "",
              "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
        md += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
        if paper:
            md += ["", f"As reported in {paper['source']}:", "",
                   "| | " + " | ".join(paper["columns"]) + " |", "|---|" + "---|" * len(paper["columns"])]
            md += ["| " + name + " | " + " | ".join(_fmt(v, 6) for v in values) + " |"
                   for name, values in paper["rows"].items()]
        if notes:
            md += [""] + [f"- {n}" for n in notes]
        spent = sum(self.run_times.values())
        md += ["", f"Scale `{self.scale}`, seed {self.seed}"
               + (f", overrides `{' '.join(self.overrides)}`" if self.overrides else "")
               + f"; settings: `configs/reproduce/{self.target}.yaml`. Wall time: {analysis:.0f} s this time"
               + (f" (training runs: {spent:.0f} s in all)" if self.run_times else "") + "."]
        (self.out / f"{self.target}.md").write_text("\n".join(md) + "\n")
        return result


def load_run(run_dir: Path):
    """``(model, datamodule, config)`` of a finished run folder: restored as ``iresflow eval``
    restores a checkpoint (its config, the registry, the checks that the checkpoint fits), with the
    weights of ``checkpoints/last.ckpt``, in eval mode."""
    from iresflow.run.evaluation import restore_checkpoint

    _, dm, task = restore_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"), [])
    return task.model.eval(), dm, task.run_config
