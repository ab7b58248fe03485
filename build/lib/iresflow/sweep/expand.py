"""A spec's run configurations, chosen the way the W&B controller chooses them.

- ``grid``: the cartesian product of the parameters' value lists, parameter names sorted and
  the first name varying slowest; ``int_uniform`` is ``range(min, max + 1)``, ``q_uniform`` is
  ``arange(min, max, q)``; repeated combinations are dropped (3 and 3.0 are one value).
- ``random``: independent draws from the W&B distributions, from ``random.Random(seed)``.
- ``bayes`` needs the server, which proposes each run from the earlier results.
"""

from __future__ import annotations

import math
import random
from itertools import product
from typing import Any

import yaml

from iresflow.sweep.spec import SweepError, flatten_parameters, parameter_distribution

__all__ = ["expand", "swept_names", "sample", "grid_values"]

_DEFAULTS = {"q": 1, "mu": 0.0, "sigma": 1.0, "a": 1.0, "b": 1.0}


def sample(dist: str, node: dict[str, Any], rng: random.Random) -> Any:
    """One draw from a W&B distribution (the controller's parametrisation: ``log_uniform`` takes
    natural-log exponents as min/max, ``*_values`` the values themselves)."""
    p = {**_DEFAULTS, **node}
    lo, hi = p.get("min"), p.get("max")

    def quantize(x: float) -> Any:
        q = p["q"]
        v = round(x / q) * q
        return int(v) if isinstance(q, int) else v

    draws = {
        "constant": lambda: node["value"],
        "categorical": lambda: rng.choice(node["values"]),
        "categorical_w_probabilities": lambda: rng.choices(node["values"], weights=node["probabilities"])[0],
        "int_uniform": lambda: rng.randint(int(lo), int(hi)),
        "uniform": lambda: rng.uniform(lo, hi),
        "q_uniform": lambda: quantize(rng.uniform(lo, hi)),
        "log_uniform": lambda: math.exp(rng.uniform(lo, hi)),
        "log_uniform_values": lambda: math.exp(rng.uniform(math.log(lo), math.log(hi))),
        "q_log_uniform": lambda: quantize(math.exp(rng.uniform(lo, hi))),
        "q_log_uniform_values": lambda: quantize(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
        "inv_log_uniform": lambda: math.exp(-rng.uniform(lo, hi)),
        "inv_log_uniform_values": lambda: math.exp(-rng.uniform(-math.log(hi), -math.log(lo))),
        "normal": lambda: rng.gauss(p["mu"], p["sigma"]),
        "q_normal": lambda: quantize(rng.gauss(p["mu"], p["sigma"])),
        "log_normal": lambda: math.exp(rng.gauss(p["mu"], p["sigma"])),
        "q_log_normal": lambda: quantize(math.exp(rng.gauss(p["mu"], p["sigma"]))),
        "beta": lambda: rng.betavariate(p["a"], p["b"]),
        "q_beta": lambda: quantize(rng.betavariate(p["a"], p["b"])),
    }
    if dist not in draws:
        raise SweepError(f"cannot sample distribution {dist!r}")
    return draws[dist]()


def grid_values(path: tuple[str, ...], dist: str, node: dict[str, Any]) -> list[Any]:
    """The values a grid takes for one parameter."""
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
    """Flattened ``(path, value)`` back into the run config; top-level keys stay in sorted order."""
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
    params = [(path, parameter_distribution(path, node), node)
              for path, node in flatten_parameters(spec["parameters"])]
    if method == "bayes":
        raise SweepError("method 'bayes' needs the W&B sweep server to propose runs: use --wandb "
                         "(with an API key and network), or set method: random and pass --count N")
    if method == "grid":
        lists = [grid_values(path, dist, node) for path, dist, node in params]
        configs, seen = [], set()
        for combo in product(*lists):
            key = tuple(_value_key(v) for v in combo)
            if key in seen:
                continue
            seen.add(key)
            configs.append(_renest([(path, v) for (path, _, _), v in zip(params, combo)]))
            if count is not None and len(configs) >= count:
                break
        return configs
    if method == "random":
        n = count if count is not None else spec.get("run_cap")
        if n is None:
            raise SweepError("random search draws forever on W&B; locally pass --count N (or set run_cap)")
        rng = random.Random(seed)
        return [_renest([(path, sample(dist, node, rng)) for path, dist, node in params]) for _ in range(int(n))]
    raise SweepError(f"unknown method {method!r}")


def swept_names(spec: dict[str, Any]) -> list[str]:
    """Top-level parameter names that vary (not constants, nor a list of one value)."""
    names = []
    for path, node in flatten_parameters(spec["parameters"]):
        dist = parameter_distribution(path, node)
        one_value = dist == "categorical" and len({_value_key(v) for v in node["values"]}) == 1
        if dist != "constant" and not one_value and path[0] not in names:
            names.append(path[0])
    return names
