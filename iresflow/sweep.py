"""``iresflow sweep SPEC``: run a W&B sweep spec locally, or hand it to ``wandb agent``.

A spec is exactly the YAML that ``wandb sweep`` accepts (``method``, ``metric``,
``parameters``, ``command``/``program``). Locally, without a W&B server:

- ``grid`` is expanded the way the W&B controller does (parameters sorted by
  name, the cartesian product of their ``values`` with the first name varying
  slowest; ``int_uniform`` / ``q_uniform`` become value lists); ``random``
  draws ``--count`` configurations from the W&B distributions with a fixed
  seed; ``bayes`` needs the server (``--wandb``).
- every configuration runs as its own process, built from the spec's
  ``command`` with the agent's macros (``${env}``, ``${interpreter}``,
  ``${program}``, ``${args_no_hyphens}``, ...) rendered exactly as the agent
  renders them, plus ``output_dir=<out>/<run_id>`` and
  ``logger.group=<sweep name>`` (in the same argument style);
- ``--parallel K`` processes at a time, ``--gpus 0,1`` pins each to one GPU;
- ``--shard K/N`` runs only every N-th run (index % N == K): N workers, e.g. the
  tasks of a SLURM job array, share one sweep folder without running a run twice;
- a failed run does not stop the sweep, a rerun skips runs whose
  ``metrics.json`` exists (and resumes a run that left ``checkpoints/last.ckpt``);
- ``summary.csv``, ``summary.md`` and ``summary.png`` (the metric against the
  swept parameter(s)) are written into the sweep folder.

Extra ``key=value`` arguments after the spec fix a parameter for every run
(``trainer.max_steps=5000``, ``data.root=/data``); they become part of each
run's configuration and of its id, so a rerun with other settings does not
mistake old results for new ones.

Python API: :func:`load_spec`, :func:`expand`, :func:`plan`, :func:`run_sweep`,
:func:`write_summary`, and :func:`add_arguments` / :func:`main` for the CLI.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as _FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product
from pathlib import Path
from typing import Any, Sequence

import yaml

from iresflow import wandb_env

__all__ = [
    "SweepError", "Run", "load_spec", "validate_spec", "apply_overrides", "expand", "format_args",
    "render_command", "run_id_of", "plan", "run_sweep", "collect", "write_summary", "plot_summary",
    "run_wandb", "add_arguments", "main", "parse_shard", "in_shard",
]

DEFAULT_OUT_ROOT = Path("runs") / "sweeps"
# the agent's default when a spec has no `command` (wandb/sdk/launch/sweeps/utils.py)
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
METHODS = ("grid", "random", "bayes")
TOP_LEVEL_KEYS = {"method", "metric", "parameters", "command", "program", "name", "description", "project",
                  "entity", "early_terminate", "run_cap", "controller", "settings", "job", "image_uri",
                  "apiVersion", "kind"}
LOG_TAIL_LINES = 20
RUN_LOG_DIR = "logs"


class SweepError(ValueError):
    """A bad spec, an impossible request (bayes locally, --wandb without a key), or a bad override."""


# --------------------------------------------------------------------------- spec

def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a sweep spec (YAML). The sweep's ``name`` defaults to the file's stem."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"no sweep spec {p}")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"cannot read sweep spec {p}: {err}") from err
    if not isinstance(spec, dict):
        raise SweepError(f"sweep spec {p} must hold a mapping")
    spec.setdefault("name", p.stem)
    validate_spec(spec, str(p))
    return spec


def validate_spec(spec: dict[str, Any], where: str = "sweep spec") -> None:
    unknown = sorted(set(spec) - TOP_LEVEL_KEYS)
    if unknown:
        raise SweepError(f"{where}: unknown top-level key(s) {', '.join(unknown)} "
                         f"(W&B accepts {', '.join(sorted(TOP_LEVEL_KEYS))})")
    method = spec.get("method")
    if method not in METHODS:
        raise SweepError(f"{where}: method must be one of {', '.join(METHODS)}, not {method!r}")
    metric = spec.get("metric")
    if metric is not None and (not isinstance(metric, dict) or "name" not in metric):
        raise SweepError(f"{where}: metric must be a mapping with a 'name' (and 'goal')")
    if metric and metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise SweepError(f"{where}: metric.goal must be minimize or maximize")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{where}: 'parameters' must be a non-empty mapping")
    for name, node in _flatten_parameters(params):
        _param_kind(name, node)  # raises on a malformed parameter
    command = spec.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command):
        raise SweepError(f"{where}: command must be a list of strings")
    if "${program}" in command and not spec.get("program"):
        raise SweepError(f"{where}: the command uses ${{program}} but the spec has no 'program'")


def _flatten_parameters(params: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Parameters as (path, node), sorted by name at every level like the W&B controller;
    a node with a ``parameters`` mapping (and nothing that makes it a parameter) is nested."""
    out = []
    for key in sorted(params):
        node = params[key]
        if not isinstance(node, dict):
            raise SweepError(f"parameter {'.'.join(prefix + (key,))!r}: expected a mapping such as "
                             f"{{values: [...]}} or {{value: x}}, got {node!r}")
        if "parameters" in node and not ({"value", "values", "distribution", "min", "max"} & set(node)):
            out.extend(_flatten_parameters(node["parameters"], prefix + (key,)))
        else:
            out.append((prefix + (key,), node))
    return out


_DEFAULTS = {"q": 1, "mu": 0.0, "sigma": 1.0, "a": 1.0, "b": 1.0}
_CONTINUOUS = {"uniform", "log_uniform", "log_uniform_values", "inv_log_uniform", "inv_log_uniform_values",
               "q_log_uniform", "q_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal",
               "beta", "q_beta"}
_DISTRIBUTIONS = {"constant", "categorical", "categorical_w_probabilities", "int_uniform", "q_uniform"} | _CONTINUOUS


def _param_kind(path: tuple[str, ...], node: dict[str, Any]) -> str:
    """The W&B distribution of a parameter node (inferred as the controller does when absent)."""
    name = ".".join(path)
    dist = node.get("distribution")
    if dist is None:
        if "value" in node:
            dist = "constant"
        elif "values" in node:
            dist = "categorical_w_probabilities" if "probabilities" in node else "categorical"
        elif "min" in node and "max" in node:
            ints = all(isinstance(node[k], int) and not isinstance(node[k], bool) for k in ("min", "max"))
            dist = "int_uniform" if ints else "uniform"
        elif "mu" in node or "sigma" in node:
            dist = "normal"
        else:
            raise SweepError(f"parameter {name!r}: give value, values, min/max or a distribution, got {node!r}")
    if dist == "categorical" and "probabilities" in node:
        dist = "categorical_w_probabilities"
    if dist not in _DISTRIBUTIONS:
        raise SweepError(f"parameter {name!r}: unknown distribution {dist!r} "
                         f"(W&B knows {', '.join(sorted(_DISTRIBUTIONS))})")
    need = {"constant": ("value",), "categorical": ("values",), "categorical_w_probabilities": ("values", "probabilities")}
    for key in need.get(dist, ("min", "max") if dist not in ("normal", "q_normal", "log_normal", "q_log_normal",
                                                              "beta", "q_beta") else ()):
        if key not in node:
            raise SweepError(f"parameter {name!r} ({dist}) needs {key!r}")
    if dist.startswith("categorical") and (not isinstance(node["values"], list) or not node["values"]):
        raise SweepError(f"parameter {name!r}: values must be a non-empty list")
    if dist == "categorical_w_probabilities":
        probs = node["probabilities"]
        if len(probs) != len(node["values"]) or abs(sum(probs) - 1.0) > 1e-6 or min(probs) < 0:
            raise SweepError(f"parameter {name!r}: probabilities must match values and sum to 1")
    if "min" in node and "max" in node and node["min"] > node["max"]:
        raise SweepError(f"parameter {name!r}: min > max")
    if dist in ("log_uniform_values", "inv_log_uniform_values", "q_log_uniform_values") and node["min"] <= 0:
        raise SweepError(f"parameter {name!r}: {dist} needs min > 0")
    return dist


def apply_overrides(spec: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``spec`` where every ``key=value`` is a constant parameter (replacing a swept one)."""
    spec = copy.deepcopy(spec)
    params = spec.setdefault("parameters", {})
    for text in overrides:
        if "=" not in text or text.startswith("="):
            raise SweepError(f"bad override {text!r}: expected key=value (e.g. trainer.max_steps=1000)")
        key, raw = text.split("=", 1)
        params[key] = {"value": _parse_override(raw)}
    return spec


def _parse_override(raw: str) -> Any:
    """YAML-typed (so the W&B config holds numbers), but a value whose W&B rendering would
    change its meaning (null -> 'None') stays the string the user typed."""
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw
    if value is None or isinstance(value, (dict, set)) or (isinstance(value, str) and value != raw):
        return raw
    if isinstance(value, float) and not math.isfinite(value):
        return raw
    return value


# --------------------------------------------------------------------------- expansion

def _sample(dist: str, node: dict[str, Any], rng: random.Random) -> Any:
    """One draw from a W&B distribution (same parametrisation as the controller)."""
    p = {**_DEFAULTS, **node}
    lo, hi = p.get("min"), p.get("max")

    def quantize(x: float) -> Any:
        q = p["q"]
        v = round(x / q) * q
        return int(v) if isinstance(q, int) else v

    if dist == "constant":
        return node["value"]
    if dist == "categorical":
        return rng.choice(node["values"])
    if dist == "categorical_w_probabilities":
        return rng.choices(node["values"], weights=node["probabilities"])[0]
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "q_uniform":
        return quantize(rng.uniform(lo, hi))
    if dist == "log_uniform":  # min/max are natural-log exponents (W&B v1)
        return math.exp(rng.uniform(lo, hi))
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "q_log_uniform":
        return quantize(math.exp(rng.uniform(lo, hi)))
    if dist == "q_log_uniform_values":
        return quantize(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if dist == "inv_log_uniform":  # 1 / exp(U(min, max)) as the controller draws it
        return math.exp(-rng.uniform(lo, hi))
    if dist == "inv_log_uniform_values":
        return math.exp(-rng.uniform(-math.log(hi), -math.log(lo)))
    if dist == "normal":
        return rng.gauss(p["mu"], p["sigma"])
    if dist == "q_normal":
        return quantize(rng.gauss(p["mu"], p["sigma"]))
    if dist == "log_normal":
        return math.exp(rng.gauss(p["mu"], p["sigma"]))
    if dist == "q_log_normal":
        return quantize(math.exp(rng.gauss(p["mu"], p["sigma"])))
    if dist == "beta":
        return rng.betavariate(p["a"], p["b"])
    if dist == "q_beta":
        return quantize(rng.betavariate(p["a"], p["b"]))
    raise SweepError(f"cannot sample distribution {dist!r}")


def _grid_values(path: tuple[str, ...], dist: str, node: dict[str, Any]) -> list[Any]:
    if dist == "constant":
        return [node["value"]]
    if dist == "categorical":
        return list(node["values"])
    if dist == "int_uniform":
        return list(range(int(node["min"]), int(node["max"]) + 1))
    if dist == "q_uniform":  # numpy.arange(min, max, q), as the controller
        q = node.get("q", 1)
        n = max(0, math.ceil((node["max"] - node["min"]) / q))
        return [node["min"] + i * q for i in range(n)]
    raise SweepError(f"grid search: parameter {'.'.join(path)!r} is {dist}; a grid takes only value, values, "
                     "int_uniform or q_uniform (use method: random with --count N for distributions)")


def _renest(flat: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """Flattened (path, value) back into the run config; top-level keys stay in sorted order."""
    config: dict[str, Any] = {}
    for path, value in flat:
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return config


def _value_key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # the controller's yaml_hash treats 3.0 and 3 as the same value
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=True)


def expand(spec: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The run configurations (``{name: value}``, top level sorted) of a spec.

    grid: all combinations, W&B order, duplicates dropped, the first ``count`` when given;
    random: ``count`` independent draws from ``random.Random(seed)`` (``run_cap`` when no count).
    """
    method = spec.get("method")
    flat = _flatten_parameters(spec["parameters"])
    kinds = [(path, _param_kind(path, node), node) for path, node in flat]
    if method == "bayes":
        raise SweepError("method 'bayes' needs the W&B sweep server to propose runs: use --wandb "
                         "(with an API key and network), or set method: random and pass --count N")
    if method == "grid":
        lists = [_grid_values(path, dist, node) for path, dist, node in kinds]
        configs, seen = [], set()
        for combo in product(*lists):
            key = tuple(_value_key(v) for v in combo)
            if key in seen:
                continue
            seen.add(key)
            configs.append(_renest([(path, v) for (path, _, _), v in zip(kinds, combo)]))
            if count is not None and len(configs) >= count:
                break
        return configs
    if method == "random":
        n = count if count is not None else spec.get("run_cap")
        if n is None:
            raise SweepError("random search draws forever on W&B; locally pass --count N (or set run_cap)")
        rng = random.Random(seed)
        return [_renest([(path, _sample(dist, node, rng)) for path, dist, node in kinds]) for _ in range(int(n))]
    raise SweepError(f"unknown method {method!r}")


def swept_names(spec: dict[str, Any]) -> list[str]:
    """Top-level parameter names that vary (not constants)."""
    names = []
    for path, node in _flatten_parameters(spec["parameters"]):
        dist = _param_kind(path, node)
        if dist != "constant" and not (dist == "categorical" and len({_value_key(v) for v in node["values"]}) == 1):
            if path[0] not in names:
                names.append(path[0])
    return names


# --------------------------------------------------------------------------- commands

def format_args(config: dict[str, Any]) -> dict[str, list[str]]:
    """The agent's argument macros for one run config (f"{key}={value}", Python formatting)."""
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def _short_value(value: Any) -> str:
    if isinstance(value, dict):  # a component node: its name, then its other settings
        rest = [f"{k}{_short_value(v)}" for k, v in sorted(value.items()) if k != "name"]
        return "-".join(([str(value["name"])] if "name" in value else []) + rest)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_short_value(v) for v in value)
    return str(value)


def _label(key: str) -> str:
    """Short name of a parameter: its last part (the component for ``...solver.name``)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def run_id_of(config: dict[str, Any], swept: Sequence[str]) -> str:
    """Stable folder name: the swept values (readable) + a hash of the whole config, so two
    configs that differ anywhere (also in fixed settings) never share a folder."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    labels = [_label(k) for k in swept]
    parts = []
    for key, label in zip(swept, labels):
        if labels.count(label) > 1:
            label = ".".join(key.rsplit(".", 2)[-2:])
        parts.append(f"{label}-{_short_value(config.get(key))}")
    readable = _slug("_".join(parts))[:64].rstrip("-._")
    return f"{readable}_{digest}" if readable else digest


@dataclass
class Run:
    """One configuration of a sweep and where its files go."""

    index: int
    run_id: str
    config: dict[str, Any]          # the W&B run config (swept + fixed parameters)
    extra: dict[str, Any]           # added locally: output_dir, logger.group, ckpt_path
    command: list[str]
    output_dir: Path
    log_path: Path
    status: str = "pending"         # pending | finished | cached | failed
    wall_time: float | None = None
    returncode: int | None = None
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return (self.output_dir / "metrics.json").is_file()


def _wants_group(config: dict[str, Any]) -> bool:
    """``logger.group`` exists only in the W&B logger's config; other loggers reject the key."""
    logger = config.get("logger", "wandb")
    return not isinstance(logger, str) or logger == "wandb"


def sweep_name(spec: dict[str, Any]) -> str:
    return _slug(str(spec.get("name") or "sweep"))


def plan(spec: dict[str, Any], out: str | os.PathLike[str], *, count: int | None = None, seed: int = 0,
         fresh: bool = False) -> list[Run]:
    """Expand ``spec`` into runs with their ids, folders and command lines (nothing is started)."""
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
        if not fresh and not (run_dir / "metrics.json").is_file() \
                and (run_dir / "checkpoints" / "last.ckpt").is_file():
            extra["ckpt_path"] = "last"  # pre-empted or crashed: continue from the last checkpoint
        log_dir = out / RUN_LOG_DIR
        command = render_command(spec, {**config, **extra}, args_json_file=str(log_dir / f"{rid}.args.json"))
        runs.append(Run(index=i, run_id=rid, config=config, extra=extra, command=command,
                        output_dir=run_dir, log_path=log_dir / f"{rid}.log"))
    return runs


# --------------------------------------------------------------------------- running

def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if ln.strip()]
    return "\n".join(lines[-n:])


def _error_line(tail: str) -> str:
    """The most telling line of a failed run's log: the last 'error'/'Error' line, else the last."""
    lines = tail.splitlines()
    for ln in reversed(lines):
        if re.search(r"(error|exception|traceback)", ln, re.IGNORECASE):
            return ln.strip()
    return lines[-1].strip() if lines else ""


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_path(run: Run) -> Path:
    return run.log_path.with_suffix(".json")


def _save_record(run: Run) -> None:
    record = {"run_id": run.run_id, "status": run.status, "wall_time": run.wall_time,
              "returncode": run.returncode, "error": run.error, "config": run.config,
              "command": run.command, "finished_at": datetime.now().isoformat(timespec="seconds")}
    try:
        _record_path(run).parent.mkdir(parents=True, exist_ok=True)
        _record_path(run).write_text(json.dumps(record, indent=2, default=str) + "\n")
    except OSError:
        pass  # the summary still has the run's status; only a later --summary-only loses it


class _Launcher:
    """Runs the processes; remembers the live ones so an interrupt can stop exactly those."""

    def __init__(self, name: str, gpus: Sequence[str] | None, parallel: int, timeout: float | None,
                 echo: bool):
        self.name, self.timeout, self.echo = name, timeout, echo
        self.live: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.slots: "list[str | None]" = [None] * parallel
        import queue

        self.gpu_queue: "queue.Queue[str] | None" = None
        if gpus:
            self.gpu_queue = queue.Queue()
            for i in range(max(parallel, 1)):  # round-robin: more workers than GPUs share them
                self.gpu_queue.put(gpus[i % len(gpus)])
        self.threads = max(1, (os.cpu_count() or 1) // max(parallel, 1))

    def env(self, gpu: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("WANDB_RUN_GROUP", self.name)  # grouping also for programs without logger.group
        env["IRESFLOW_SWEEP"] = self.name
        if self.threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(self.threads)  # K runs share the CPU cores
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def __call__(self, run: Run) -> Run:
        if self.stopping:
            return run
        gpu = self.gpu_queue.get() if self.gpu_queue is not None else None
        try:
            return self._run(run, gpu)
        except Exception as err:  # a run that cannot even start is a failed run, not a failed sweep
            run.status, run.returncode = "failed", None
            run.error = f"error: could not start the run: {type(err).__name__}: {err}"
            _save_record(run)
            self._say(f"[{run.index + 1}] {run.run_id}: failed: {run.error}")
            return run
        finally:
            if gpu is not None:
                self.gpu_queue.put(gpu)

    def _run(self, run: Run, gpu: str | None) -> Run:
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        if run.output_dir.exists() and "ckpt_path" not in run.extra:
            shutil.rmtree(run.output_dir)  # an earlier attempt that left no checkpoint: start clean
        if any("args.json" in c for c in run.command):
            _write_args_json(run)
        where = f" on GPU {gpu}" if gpu is not None else ""
        self._say(f"[{run.index + 1}] start {run.run_id}{where}")
        start = time.perf_counter()
        with open(run.log_path, "w") as log:
            log.write("$ " + shlex.join(run.command) + "\n\n")
            log.flush()
            proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env(gpu), start_new_session=True)
            with self.lock:
                self.live[proc.pid] = proc
            try:
                run.returncode = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _stop(proc)
                run.returncode = proc.wait()
                log.write(f"\nerror: run exceeded the sweep's --timeout of {self.timeout:g} s\n")
            finally:
                with self.lock:
                    self.live.pop(proc.pid, None)
        run.wall_time = time.perf_counter() - start
        run.metrics = _read_metrics(run.output_dir / "metrics.json")
        if run.returncode == 0 and run.done:
            run.status, run.error = "finished", ""
        else:
            run.status = "failed"
            tail = _tail(run.log_path)
            if run.returncode == 0:
                tail += f"\nerror: exit code 0 but no {run.output_dir / 'metrics.json'}"
            run.error = tail
        _save_record(run)
        msg = f"{run.status} in {run.wall_time:.1f} s"
        if run.status == "failed":
            msg += f" (exit {run.returncode}): {_error_line(run.error)}  [log: {run.log_path}]"
        self._say(f"[{run.index + 1}] {run.run_id}: {msg}")
        return run

    def stop_all(self) -> None:
        self.stopping = True
        with self.lock:
            procs = list(self.live.values())
        for proc in procs:
            _stop(proc)

    def _say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)


def _write_args_json(run: Run) -> None:
    for chunk in run.command:
        if chunk.endswith(".args.json"):
            Path(chunk).write_text(json.dumps({**run.config, **run.extra}))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (it may have started DDP workers), SIGKILL after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def run_sweep(runs: list[Run], *, name: str = "sweep", parallel: int = 1, gpus: Sequence[str] | None = None,
              timeout: float | None = None, echo: bool = True) -> list[Run]:
    """Run every run that has no ``metrics.json`` yet (``parallel`` at a time); the others are
    marked ``cached``. Failures are recorded, never raised. Returns ``runs`` (updated)."""
    todo = []
    for run in runs:
        if run.done:
            run.status = "cached"
            run.metrics = _read_metrics(run.output_dir / "metrics.json")
            old = _read_metrics(_record_path(run))
            run.wall_time = old.get("wall_time")
        else:
            todo.append(run)
    if echo:
        cached = len(runs) - len(todo)
        print(f"sweep {name}: {len(runs)} runs, {cached} already finished, {len(todo)} to run"
              f" ({parallel} at a time{', GPUs ' + ','.join(gpus) if gpus else ''})", flush=True)
    if not todo:
        return runs
    launcher = _Launcher(name, gpus, parallel, timeout, echo)
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        futures = [pool.submit(launcher, run) for run in todo]
        for f in futures:
            while True:  # short waits keep the main thread responsive to Ctrl-C
                try:
                    f.result(timeout=0.5)
                    break
                except _FutureTimeout:
                    continue
    except KeyboardInterrupt:
        launcher.stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return runs


# --------------------------------------------------------------------------- summary

def collect(runs: list[Run]) -> None:
    """Fill status / metrics of runs that were not run now (e.g. --summary-only)."""
    for run in runs:
        if run.status != "pending":
            continue
        record = _read_metrics(_record_path(run))
        if run.done:
            run.status = "cached"
            run.metrics = _read_metrics(run.output_dir / "metrics.json")
            run.wall_time = record.get("wall_time")
        elif record.get("status") == "failed":
            run.status, run.error = "failed", record.get("error", "")
            run.wall_time, run.returncode = record.get("wall_time"), record.get("returncode")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) + "}"
    return str(value)


def _metric(run: Run, name: str | None) -> float | None:
    if not name or name not in run.metrics:
        return None
    try:
        v = float(run.metrics[name])
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def write_summary(runs: list[Run], spec: dict[str, Any], out: str | os.PathLike[str],
                  extra_metrics: Sequence[str] = ()) -> dict[str, Path]:
    """``summary.csv`` (every parameter and metric), ``summary.md`` (swept parameters, the
    spec's metric, status, wall time; failures with their log tail) and ``summary.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = (spec.get("metric") or {}).get("name")
    goal = (spec.get("metric") or {}).get("goal", "minimize")
    swept = swept_names(spec)
    fixed = [k for k in (runs[0].config if runs else {}) if k not in swept]
    all_metrics = sorted({k for r in runs for k in r.metrics} - {metric})

    csv_path = out / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", *swept, metric or "metric", "status", "wall_time_s", *fixed, *all_metrics, "error"])
        for r in runs:
            w.writerow([r.run_id, *(_cell(r.config.get(k)) for k in swept), _cell(_metric(r, metric)), r.status,
                        _cell(r.wall_time), *(_cell(r.config.get(k)) for k in fixed),
                        *(_cell(r.metrics.get(k)) for k in all_metrics), _error_line(r.error)])

    values = [(_metric(r, metric), r) for r in runs if _metric(r, metric) is not None]
    best = (min if goal == "minimize" else max)(values, key=lambda t: t[0])[1] if values else None
    extra = [m for m in extra_metrics if m != metric]
    md = [f"# Sweep `{sweep_name(spec)}`", ""]
    if spec.get("description"):
        md += [str(spec["description"]).strip(), ""]
    md += [f"method: {spec.get('method')}; metric: `{metric}` ({goal}); runs: {len(runs)} "
           f"({sum(r.status in ('finished', 'cached') for r in runs)} finished, "
           f"{sum(r.status == 'failed' for r in runs)} failed)", ""]
    if fixed:
        md += ["fixed: " + ", ".join(f"`{k}={_cell(runs[0].config[k])}`" for k in fixed), ""]
    header = [*swept, metric or "metric", *extra, "status", "wall time (s)", "run"]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        m = _cell(_metric(r, metric))
        if r is best:
            m = f"**{m}**"
        status = r.status if r.status != "failed" else f"failed: {_error_line(r.error)[:80]}"
        row = [*(_cell(r.config.get(k)) for k in swept), m, *(_cell(r.metrics.get(k)) for k in extra),
               status.replace("|", "\\|"), "" if r.wall_time is None else f"{r.wall_time:.3g}",
               f"`{r.run_id}`"]
        md.append("| " + " | ".join(row) + " |")
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        md += ["", "## Failed runs", ""]
        for r in failed:
            md += [f"### `{r.run_id}` (exit {r.returncode})", "", f"log: `{r.log_path}`", "", "```",
                   r.error.strip() or "(no output)", "```", ""]
    md_path = out / "summary.md"
    md_path.write_text("\n".join(md).rstrip() + "\n")
    paths = {"csv": csv_path, "md": md_path}
    png = plot_summary(runs, spec, out / "summary.png")
    if png is not None:
        paths["png"] = png
    return paths


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_summary(runs: list[Run], spec: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """The metric against the swept parameter: a line per combination of the other swept
    parameters when one of them is numeric, else bars per configuration."""
    metric = (spec.get("metric") or {}).get("name")
    points = [(r, _metric(r, metric)) for r in runs]
    points = [(r, m) for r, m in points if m is not None]
    if not metric or not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    swept = swept_names(spec)
    numeric = [k for k in swept if all(_is_number(r.config.get(k)) for r, _ in points)
               and len({r.config.get(k) for r, _ in points}) > 1]
    n_failed = sum(r.status == "failed" for r in runs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if numeric:
        # the x axis: the numeric parameter with the most distinct values
        x_key = max(numeric, key=lambda k: len({r.config.get(k) for r, _ in points}))
        others = [k for k in swept if k != x_key]
        groups: dict[tuple, list[tuple[float, float]]] = {}
        for r, m in points:
            label = tuple(_cell(r.config.get(k)) for k in others)
            groups.setdefault(label, []).append((float(r.config[x_key]), m))
        for label, xy in sorted(groups.items()):
            xy.sort()
            text = ", ".join(f"{_label(k)}={v}" for k, v in zip(others, label)) or None
            ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=text)
        xs = sorted({float(r.config[x_key]) for r, _ in points})
        if xs[0] > 0 and xs[-1] / xs[0] >= 8:
            ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
        if len(xs) <= 12:
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_xlabel(x_key)
        if any(label for label in groups if label):
            ax.legend(fontsize=8)
    else:
        labels = [", ".join(f"{_label(k)}={_cell(r.config.get(k))}" for k in swept) or r.run_id
                  for r, _ in points]
        ax.bar(range(len(points)), [m for _, m in points], color="tab:blue")
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels(labels, rotation=30 if max(map(len, labels)) > 12 else 0, ha="right", fontsize=8)
        lo, hi = min(m for _, m in points), max(m for _, m in points)
        pad = 0.1 * (hi - lo) if hi > lo else 0.1 * abs(hi) or 1.0
        if lo > 0 and lo - pad > 0 and hi - lo < 0.5 * hi:  # zoom in where the bars differ little
            ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(metric)
    goal = (spec.get("metric") or {}).get("goal", "minimize")
    title = f"{sweep_name(spec)}: {metric} ({'lower' if goal == 'minimize' else 'higher'} is better)"
    if n_failed:
        title += f"; {n_failed} failed run(s) not shown"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- W&B server

def run_wandb(spec: dict[str, Any], *, count: int | None = None, parallel: int = 1,
              gpus: Sequence[str] | None = None, project: str | None = None, entity: str | None = None,
              register_timeout: float = 60.0, sweep_id: str | None = None) -> int:
    """Register ``spec`` on the W&B server and run ``wandb agent`` (one per worker / GPU).

    With ``sweep_id`` the sweep exists already (registered by an earlier call or by
    ``wandb sweep``): only the agents start, so every allocation of a cluster job can
    join the same sweep.
    """
    if not wandb_env.api_key_available():
        raise SweepError("--wandb needs a W&B API key: set WANDB_API_KEY or run `wandb login` "
                         "(no key in the environment or in ~/.netrc). Without --wandb the sweep runs "
                         "locally and its runs still log to W&B offline, grouped by the sweep name.")
    host, port = wandb_env.server()
    if not wandb_env.server_reachable(timeout=3.0):
        raise SweepError(f"--wandb: the W&B server {host}:{port} cannot be reached (no network?). "
                         "Run the sweep locally without --wandb, and `wandb sync` the offline runs later.")
    project = project or spec.get("project") or "iresflow"
    if sweep_id:
        return _start_agents(sweep_id, entity, project, count, parallel, gpus)
    import wandb

    result: dict[str, Any] = {}

    def register() -> None:
        try:
            result["id"] = wandb.sweep(spec, entity=entity, project=project)
        except Exception as err:  # reported below with its message
            result["error"] = err

    t = threading.Thread(target=register, daemon=True)
    t.start()
    t.join(register_timeout)
    if t.is_alive():
        raise SweepError(f"--wandb: registering the sweep took longer than {register_timeout:g} s; giving up")
    if "error" in result:
        raise SweepError(f"--wandb: the W&B server refused the sweep: {result['error']}")
    print(f"sweep registered: {result['id']} (join it from other machines with --sweep-id {result['id']})",
          flush=True)
    return _start_agents(result["id"], entity, project, count, parallel, gpus)


def _start_agents(sweep_id: str, entity: str | None, project: str, count: int | None, parallel: int,
                  gpus: Sequence[str] | None) -> int:
    """``wandb agent`` processes for a registered sweep (one per worker / GPU); their exit code."""
    # a full path entity/project/id may be given as the id
    path = sweep_id if sweep_id.count("/") == 2 else "/".join(p for p in (entity, project, sweep_id) if p)
    cmd = [sys.executable, "-m", "wandb", "agent"] + (["--count", str(count)] if count else []) + [path]
    env = dict(os.environ)
    # the agent runs `python` from PATH for ${interpreter}: make that this environment's Python
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    n = max(1, parallel, len(gpus or []))
    print(f"sweep {path}: starting {n} agent(s): {shlex.join(cmd)}", flush=True)
    procs = []
    for i in range(n):
        e = dict(env)
        if gpus:
            e["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        procs.append(subprocess.Popen(cmd, env=e, stdin=subprocess.DEVNULL, start_new_session=True))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            _stop(p)
        raise
    return max(codes)


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``iresflow sweep`` (also used by ``python -m iresflow.sweep``)."""
    parser.add_argument("spec", help="W&B sweep spec (YAML), e.g. sweeps/coeff.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="key=value fixed for every run (replaces a swept parameter of that name), "
                             "e.g. trainer.max_steps=2000 data.root=/data")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their command lines; start nothing")
    parser.add_argument("--count", type=int, default=None,
                        help="random: number of runs (required); grid: run only the first N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search (default 0)")
    parser.add_argument("--parallel", type=int, default=None, metavar="K",
                        help="runs at a time (default 1, or one per GPU with --gpus)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids; each worker is pinned to one (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--out", default=None,
                        help=f"sweep folder (default {DEFAULT_OUT_ROOT}/<sweep name>); run i writes to <out>/<run_id>")
    parser.add_argument("--fresh", action="store_true",
                        help="restart unfinished runs from scratch instead of resuming their last checkpoint")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a run after this long (it is marked failed)")
    parser.add_argument("--metrics", default="",
                        help="more metrics (comma-separated) for the Markdown table, e.g. test/recon_error")
    parser.add_argument("--summary-only", action="store_true",
                        help="rewrite the summary from the runs' files without starting anything")
    parser.add_argument("--wandb", action="store_true",
                        help="register the sweep on the W&B server and run `wandb agent` (needs a key + network)")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="run only the runs with index %% N == K (0 <= K < N): N workers (e.g. the tasks "
                             "of a SLURM job array) share one sweep folder; the summary lists every run")
    parser.add_argument("--sweep-id", default=None, metavar="ID",
                        help="with --wandb: join this registered sweep (ID or entity/project/ID) instead of "
                             "registering the spec again; one agent per allocation")
    parser.add_argument("--project", default=None, help="W&B project for --wandb (default: the spec's, or iresflow)")
    parser.add_argument("--entity", default=None, help="W&B entity for --wandb")

    # argparse fills a nargs="*" positional only once, so `SPEC --dry-run a=1` would leave
    # `a=1` unrecognised; collect key=value leftovers into the overrides (also as a subparser).
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = plain(args, namespace)
        rest = []
        for a in extras:
            if "=" in a and not a.startswith("-"):
                ns.overrides = list(ns.overrides or []) + [a]
            else:
                rest.append(a)
        return ns, rest

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser


CLI_HELP = "run a W&B sweep spec locally (or on the W&B server with --wandb)"
CLI_DESCRIPTION = """Run a W&B sweep spec (sweeps/*.yaml): every configuration as its own process,
a summary table (CSV + Markdown) and a plot of the metric; resumable.

examples:
  iresflow sweep sweeps/coeff.yaml --dry-run
  iresflow sweep sweeps/coeff_density.yaml --parallel 2 trainer.max_steps=3000
  iresflow sweep sweeps/series_length.yaml --gpus 0,1,2,3
  iresflow sweep sweeps/ablation_activation.yaml --wandb     # W&B server + wandb agent
  iresflow sweep sweeps/coeff.yaml --shard $SLURM_ARRAY_TASK_ID/5   # one of 5 array tasks"""


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise SweepError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4), not {text!r}")
    return int(m.group(1)), int(m.group(2))


def in_shard(run: Run, shard: tuple[int, int] | None) -> bool:
    return shard is None or run.index % shard[1] == shard[0]


def _print_plan(runs: list[Run], spec: dict[str, Any], out: Path, shard: tuple[int, int] | None = None) -> None:
    swept = swept_names(spec)
    mine = f"; shard {shard[0]}/{shard[1]} runs {sum(in_shard(r, shard) for r in runs)} of them" if shard else ""
    print(f"sweep {sweep_name(spec)} ({spec['method']}): {len(runs)} runs -> {out}{mine}")
    fixed = {k: v for k, v in (runs[0].config.items() if runs else []) if k not in swept}
    if fixed:
        print("fixed: " + " ".join(f"{k}={_cell(v)}" for k, v in fixed.items()))
    for r in runs:
        state = "done, skipped" if r.done else ("resumes last.ckpt" if "ckpt_path" in r.extra else "to run")
        if not in_shard(r, shard):
            state = "another shard's"
        values = " ".join(f"{k}={_cell(r.config.get(k))}" for k in swept)
        print(f"\n[{r.index + 1}] {r.run_id}  {values}  ({state})")
        print("    " + shlex.join(r.command))


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``iresflow sweep``: returns 0 when every run finished, 1 when some failed, 2 on a bad request."""
    if not isinstance(args, argparse.Namespace):
        parser = add_arguments(argparse.ArgumentParser(prog="iresflow sweep", description=CLI_DESCRIPTION,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))
        args = parser.parse_args(list(sys.argv[1:] if args is None else args))
    try:
        spec = apply_overrides(load_spec(args.spec), args.overrides or [])
        validate_spec(spec, args.spec)
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        shard = parse_shard(getattr(args, "shard", None))
        if getattr(args, "sweep_id", None) and not args.wandb:
            raise SweepError("--sweep-id joins a sweep on the W&B server; add --wandb")
        parallel = args.parallel or (len(gpus) if gpus else 1)
        if parallel < 1:
            raise SweepError("--parallel must be >= 1")
        if args.wandb:
            if args.dry_run:
                raise SweepError("--dry-run and --wandb: the server chooses the runs; drop --wandb to list them")
            if shard:
                raise SweepError("--shard splits a local sweep; with --wandb the server hands out the runs")
            return run_wandb(spec, count=args.count, parallel=parallel, gpus=gpus,
                             project=args.project, entity=args.entity, sweep_id=getattr(args, "sweep_id", None))
        out = Path(args.out) if args.out else DEFAULT_OUT_ROOT / sweep_name(spec)
        runs = plan(spec, out, count=args.count, seed=args.seed, fresh=args.fresh)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        _print_plan(runs, spec, out.resolve(), shard)
        return 0
    extra = [m.strip() for m in (args.metrics or "").split(",") if m.strip()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    interrupted = False
    if args.summary_only:
        collect(runs)
    else:
        try:
            run_sweep([r for r in runs if in_shard(r, shard)], name=sweep_name(spec), parallel=parallel,
                      gpus=gpus, timeout=args.timeout)
        except KeyboardInterrupt:
            interrupted = True
        collect(runs)  # other shards' runs (and, after an interrupt, the unfinished ones)
    paths = write_summary(runs, spec, out, extra_metrics=extra)
    print(f"\nsummary: {paths['md']}\n         {paths['csv']}" + (f"\nplot:    {paths['png']}" if "png" in paths else ""))
    print(paths["md"].read_text().split("\n## Failed runs")[0])
    if interrupted:
        print("interrupted; run the same command again to continue the sweep", file=sys.stderr)
        return 130
    return 1 if any(r.status == "failed" for r in runs if in_shard(r, shard)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
