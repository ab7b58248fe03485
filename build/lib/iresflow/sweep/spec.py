"""A sweep spec: the YAML that ``wandb sweep`` accepts, read, checked and given fixed settings.

A spec has a ``method`` (grid, random, bayes), a ``metric`` ``{name, goal}``, ``parameters``
(each a W&B parameter node: ``value``, ``values``, ``min``/``max`` or a ``distribution``;
a node holding only ``parameters`` nests) and a ``command`` / ``program``.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["SweepError", "DEFAULT_COMMAND", "METHODS", "load_spec", "validate_spec", "apply_overrides",
           "flatten_parameters", "parameter_distribution", "sweep_name", "slug"]

# the agent's default when a spec has no `command` (wandb/sdk/launch/sweeps/utils.py)
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
METHODS = ("grid", "random", "bayes")
TOP_LEVEL_KEYS = {"method", "metric", "parameters", "command", "program", "name", "description", "project",
                  "entity", "early_terminate", "run_cap", "controller", "settings", "job", "image_uri",
                  "apiVersion", "kind"}

CONTINUOUS = {"uniform", "log_uniform", "log_uniform_values", "inv_log_uniform", "inv_log_uniform_values",
              "q_log_uniform", "q_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal",
              "beta", "q_beta"}
DISTRIBUTIONS = {"constant", "categorical", "categorical_w_probabilities", "int_uniform", "q_uniform"} | CONTINUOUS
_NO_BOUNDS = {"normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta"}
_REQUIRED = {"constant": ("value",), "categorical": ("values",),
             "categorical_w_probabilities": ("values", "probabilities")}


class SweepError(ValueError):
    """A bad spec, an impossible request (bayes locally, --wandb without a key), or a bad override."""


def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a sweep spec (YAML). The sweep's ``name`` defaults to the file's stem.

    A path that is not a file may name a shipped spec: ``coeff`` or ``sweeps/coeff.yaml`` is the
    ``sweeps/coeff.yaml`` that comes with iresflow (the checkout's, or the installed package's)."""
    p = Path(path)
    if not p.is_file():
        from iresflow.resources import shipped_folder

        shipped = shipped_folder("sweeps") / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
        if not shipped.is_file():
            names = ", ".join(sorted(f.stem for f in shipped.parent.glob("*.yaml")))
            raise SweepError(f"no sweep spec {p} (the shipped ones: {names})")
        p = shipped
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
    """Raise :class:`SweepError` naming the first thing W&B would reject."""
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
    for path, node in flatten_parameters(params):
        parameter_distribution(path, node)  # raises on a malformed parameter
    command = spec.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command):
        raise SweepError(f"{where}: command must be a list of strings")
    if "${program}" in command and not spec.get("program"):
        raise SweepError(f"{where}: the command uses ${{program}} but the spec has no 'program'")


def flatten_parameters(params: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Parameters as ``(path, node)``, sorted by name at every level like the W&B controller;
    a node with a ``parameters`` mapping (and nothing that makes it a parameter) is nested."""
    out = []
    for key in sorted(params):
        node = params[key]
        if not isinstance(node, dict):
            raise SweepError(f"parameter {'.'.join(prefix + (key,))!r}: expected a mapping such as "
                             f"{{values: [...]}} or {{value: x}}, got {node!r}")
        if "parameters" in node and not ({"value", "values", "distribution", "min", "max"} & set(node)):
            out.extend(flatten_parameters(node["parameters"], prefix + (key,)))
        else:
            out.append((prefix + (key,), node))
    return out


def _inferred_distribution(name: str, node: dict[str, Any]) -> str:
    """The distribution the controller assumes for a node that names none."""
    if "value" in node:
        return "constant"
    if "values" in node:
        return "categorical_w_probabilities" if "probabilities" in node else "categorical"
    if "min" in node and "max" in node:
        ints = all(isinstance(node[k], int) and not isinstance(node[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    if "mu" in node or "sigma" in node:
        return "normal"
    raise SweepError(f"parameter {name!r}: give value, values, min/max or a distribution, got {node!r}")


def parameter_distribution(path: tuple[str, ...], node: dict[str, Any]) -> str:
    """The W&B distribution of a parameter node, checked for the keys that distribution needs."""
    name = ".".join(path)
    dist = node.get("distribution")
    if dist is None:
        dist = _inferred_distribution(name, node)
    if dist == "categorical" and "probabilities" in node:
        dist = "categorical_w_probabilities"
    if dist not in DISTRIBUTIONS:
        raise SweepError(f"parameter {name!r}: unknown distribution {dist!r} "
                         f"(W&B knows {', '.join(sorted(DISTRIBUTIONS))})")
    for key in _REQUIRED.get(dist, () if dist in _NO_BOUNDS else ("min", "max")):
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


def slug(text: str) -> str:
    """``text`` as a file name: runs of other characters become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def sweep_name(spec: dict[str, Any]) -> str:
    return slug(str(spec.get("name") or "sweep"))
