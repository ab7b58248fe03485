"""Run planning: each configuration's id, folder, log and command line (nothing is started).

The command is the spec's ``command`` with the W&B agent's macros rendered as the agent
renders them (``${env}``, ``${interpreter}``, ``${program}``, ``${args}``,
``${args_no_hyphens}``, ...), for the run's configuration plus the settings the sweep adds:
``output_dir=<out>/<run_id>``, ``logger.group=<sweep name>`` (W&B logger only) and
``ckpt_path=auto`` (the program resumes the folder's checkpoint when there is one, else starts
fresh), or ``overwrite=true`` instead with ``--fresh``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from iresflow.sweep.expand import expand, swept_names
from iresflow.sweep.spec import DEFAULT_COMMAND, SweepError, slug, sweep_name

__all__ = ["Run", "RUN_LOG_DIR", "format_args", "render_command", "run_id_of", "plan"]

RUN_LOG_DIR = "logs"
SET_BY_SWEEP = ("output_dir", "ckpt_path", "overwrite")  # per run, from --out and --fresh


@dataclass(frozen=True)
class Run:
    """One configuration of a sweep and where its files go."""

    index: int
    run_id: str
    config: dict[str, Any]          # the W&B run config (swept + fixed parameters)
    extra: dict[str, Any]           # added by the sweep: output_dir, logger.group, ckpt_path / overwrite
    command: list[str]
    output_dir: Path
    log_path: Path                  # logs/<run_id>.log: every attempt's output, appended

    @property
    def record_path(self) -> Path:
        """logs/<run_id>.json: the sweep's record of the run and its attempts."""
        return self.log_path.with_suffix(".json")

    @property
    def args_json_path(self) -> Path:
        """logs/<run_id>.args.json, for the ``${args_json_file}`` macro."""
        return self.log_path.with_suffix(".args.json")


def format_args(config: dict[str, Any]) -> dict[str, list[str]]:
    """The agent's argument macros for one run config (``f"{key}={value}"``, Python formatting)."""
    flags, no_hyphens, no_bool, no_equals, hydra_add, hydra_over = [], [], [], [], [], []
    for key, value in config.items():
        flag = f"{key}={value}"
        flags.append("--" + flag)
        no_hyphens.append(flag)
        no_equals += [f"--{key}", str(value)]
        hydra_add.append("+" + flag)
        hydra_over.append("++" + flag)
        if isinstance(value, bool):
            if value:
                no_bool.append("--" + key)
        else:
            no_bool.append("--" + flag)
    return {"args": flags, "args_no_hyphens": no_hyphens, "args_no_boolean_flags": no_bool,
            "args_no_equals": no_equals, "args_json": [json.dumps(config)],
            "args_append_hydra": hydra_add, "args_override_hydra": hydra_over}


_ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")


def render_command(spec: dict[str, Any], config: dict[str, Any], *, interpreter: str | None = None,
                   args_json_file: str | None = None) -> list[str]:
    """The command line the agent would start for ``config`` (the interpreter is this Python,
    where the agent would take ``python`` from PATH)."""
    macros = format_args(config)
    macros["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    macros["interpreter"] = [interpreter or sys.executable]
    macros["program"] = [str(spec["program"])] if spec.get("program") else []
    if args_json_file is not None:
        macros["args_json_file"] = [args_json_file]
    out: list[str] = []
    for chunk in spec.get("command", DEFAULT_COMMAND):
        chunk = _ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), str(chunk))
        if chunk.startswith("${") and chunk.endswith("}"):
            name = chunk[2:-1]
            if name not in macros:
                raise SweepError(f"unknown macro {chunk} in the sweep command "
                                 f"(known: {', '.join('${' + m + '}' for m in sorted(macros))})")
            out += macros[name]
        else:
            out.append(chunk)
    return out


def _short_value(value: Any) -> str:
    if isinstance(value, dict):  # a component node: its name, then its other settings
        rest = [f"{k}{_short_value(v)}" for k, v in sorted(value.items()) if k != "name"]
        return "-".join(([str(value["name"])] if "name" in value else []) + rest)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_short_value(v) for v in value)
    return str(value)


def label(key: str) -> str:
    """Short name of a parameter: its last part (the component for ``...solver.name``)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def run_id_of(config: dict[str, Any], swept: Sequence[str]) -> str:
    """Stable folder name: the swept values (readable) + a hash of the whole config, so two
    configs that differ anywhere (also in fixed settings) never share a folder."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    labels = [label(k) for k in swept]
    parts = []
    for key, short in zip(swept, labels):
        if labels.count(short) > 1:
            short = ".".join(key.rsplit(".", 2)[-2:])
        parts.append(f"{short}-{_short_value(config.get(key))}")
    readable = slug("_".join(parts))[:64].rstrip("-._")
    return f"{readable}_{digest}" if readable else digest


def _wants_group(config: dict[str, Any]) -> bool:
    """``logger.group`` exists only in the W&B logger's config; other loggers reject the key."""
    logger = config.get("logger", "wandb")
    return not isinstance(logger, str) or logger == "wandb"


def plan(spec: dict[str, Any], out: str | os.PathLike[str], *, count: int | None = None, seed: int = 0,
         fresh: bool = False) -> list[Run]:
    """Expand ``spec`` into runs with their ids, folders and command lines (nothing is started).

    Every run resumes its folder (``ckpt_path=auto``); ``fresh`` asks the program to start
    each one over instead (``overwrite=true``)."""
    taken = [key for key in SET_BY_SWEEP if key in spec.get("parameters", {})]
    if taken:
        raise SweepError(f"{', '.join(taken)}: set by the sweep for each run; choose the sweep folder "
                         "with --out and start unfinished runs over with --fresh")
    out = Path(out).resolve()
    swept = swept_names(spec)
    name = sweep_name(spec)
    runs, ids = [], set()
    for i, config in enumerate(expand(spec, count=count, seed=seed)):
        rid = run_id_of(config, swept)
        if rid in ids:  # random draws can repeat on a small discrete space
            rid = f"{rid}-{i}"
        ids.add(rid)
        run_dir = out / rid
        extra: dict[str, Any] = {"output_dir": str(run_dir)}
        if _wants_group(config):
            extra["logger.group"] = name
        if fresh:
            extra["overwrite"] = True
        else:
            extra["ckpt_path"] = "auto"
        log_path = out / RUN_LOG_DIR / f"{rid}.log"
        command = render_command(spec, {**config, **extra}, args_json_file=str(log_path.with_suffix(".args.json")))
        runs.append(Run(index=i, run_id=rid, config=config, extra=extra, command=command,
                        output_dir=run_dir, log_path=log_path))
    return runs
