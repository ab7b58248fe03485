"""The types config values must have, checked with the config (before torch or Lightning loads).

A key's accepted types come from, first to last:

1. :data:`KEY_TYPES`: keys whose default does not say what they take (a ``null`` default,
   a key that takes several types, like ``model.hidden``: one width or a list of them);
2. :data:`TRAINER_ARGUMENTS`: the types of lightning's ``Trainer`` arguments, for
   ``trainer.*`` (``tests/test_config.py`` checks the table against Lightning's signature);
3. the registry's part kinds: a key named after one (``model.activation``, ``model.prior``,
   ``task.optimizer``, ``model.estimator.trace``) or ending in ``_<kind>`` (``task.eval_estimator``,
   ``model.fc_residual``) takes a component: a name, a node ``{name: ..., **params}`` or a list
   of them (one per scale), or ``null`` (the component's own default, where it has one).
   The kinds are a plain list in :mod:`iresflow.registry`, known without importing torch;
4. the value in the config files, when that is unambiguous: an integer takes integers, a
   float takes numbers, ``true``/``false`` takes booleans, a string takes text (a number
   typed for it is kept as its text), a list takes a list, a component node its name or a
   node. A ``null`` default takes anything.

So ``model.coeff=abc`` or ``trainer.max_steps=ten`` is answered as soon as the config is
composed, with the key, what it takes and what was given.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

__all__ = ["Accepts", "KEY_TYPES", "TRAINER_ARGUMENTS", "TRAINER_SET_BY_IRESFLOW", "RENAMED", "accepts_for",
           "check_value", "component_kind"]

_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
               "list": "a list like [1, 2]", "dict": "a mapping of settings", "null": "null"}


@dataclass(frozen=True)
class Accepts:
    """What a key takes: kinds out of int, float, bool, str, list, dict, null, and exact words."""

    kinds: tuple[str, ...] = ()
    words: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"'{w}'" for w in self.words] + [_KIND_WORDS[k] for k in self.kinds]
        return " or ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + " or " + parts[-1]


def A(*kinds: str, words: tuple[str, ...] = ()) -> Accepts:  # noqa: N802  (a short table constructor)
    return Accepts(tuple(kinds), tuple(words))


#: keys (fnmatch patterns) whose defaults do not say what they take
KEY_TYPES: dict[str, Accepts] = {
    "seed": A("int"),
    "name": A("str", "null"),
    "experiment": A("str", "null"),
    "output_dir": A("str", "null"),
    "overwrite": A("bool"),
    "ckpt_path": A("str", "null"),  # auto | last | a path
    "resume_changes": A(words=("refuse", "allow")),
    "checkpoint.every_minutes": A("float", "null"),
    "checkpoint.every_n_steps": A("int", "null"),
    "requeue": A("bool"),
    "threads": A("int", "null", words=("auto", "default")),
    "plugins": A("list"),
    "data.val_split": A("float"),                     # a fraction or a count
    "data.augment": A("bool", "null"),
    "data.eval_batch_size": A("int", "null"),
    "data.image_size": A("list"),
    "model.hidden": A("int", "list"),                 # one width, or one per layer
    "model.actnorm": A("bool", words=("before", "after", "input_and_after", "none")),  # where the ActNorms go
    "model.fc_hidden": A("list"),
    "model.padding_distribution": A(words=("uniform", "gaussian")),
    "model.logit_alpha": A("float", "null"),          # null: no logit transform
    "task.ema_decay": A("float", "null"),             # null: no EMA of the weights
    "task.head": A(words=("per_scale", "final")),
    "task.milestones": A("list"),
    "logger.entity": A("str", "null"),
    "logger.group": A("str", "null"),
    "logger.tags": A("list"),
    "logger.mode": A(words=("auto", "online", "offline", "disabled")),
}

#: lightning.pytorch.Trainer's keyword arguments and what each takes (lightning 2.x)
TRAINER_ARGUMENTS: dict[str, Accepts] = {
    "accelerator": A("str"), "strategy": A("str", "dict"), "devices": A("int", "str", "list"),
    "num_nodes": A("int"), "precision": A("int", "str", "null"), "fast_dev_run": A("int", "bool"),
    "max_epochs": A("int", "null"), "min_epochs": A("int", "null"), "max_steps": A("int"),
    "min_steps": A("int", "null"), "max_time": A("str", "dict", "null"),
    "limit_train_batches": A("int", "float", "null"), "limit_val_batches": A("int", "float", "null"),
    "limit_test_batches": A("int", "float", "null"), "limit_predict_batches": A("int", "float", "null"),
    "overfit_batches": A("int", "float"), "val_check_interval": A("int", "float", "str", "dict", "null"),
    "check_val_every_n_epoch": A("int", "null"), "num_sanity_val_steps": A("int", "null"),
    "log_every_n_steps": A("int", "null"), "enable_checkpointing": A("bool", "null"),
    "enable_progress_bar": A("bool", "null"), "enable_model_summary": A("bool", "null"),
    "accumulate_grad_batches": A("int"), "gradient_clip_val": A("int", "float", "null"),
    "gradient_clip_algorithm": A("str", "null"), "deterministic": A("bool", "null", words=("warn",)),
    "benchmark": A("bool", "null"), "inference_mode": A("bool"), "use_distributed_sampler": A("bool"),
    "profiler": A("str", "null"), "detect_anomaly": A("bool"), "barebones": A("bool"),
    "sync_batchnorm": A("bool"), "reload_dataloaders_every_n_epochs": A("int"),
    "enable_autolog_hparams": A("bool"), "model_registry": A("str", "null"),
    # set by iresflow, refused in the config
    "logger": A(), "callbacks": A(), "plugins": A(), "default_root_dir": A(),
}
TRAINER_SET_BY_IRESFLOW = {"logger": "the logger group (logger=csv)", "callbacks": "checkpoint.* settings",
                           "plugins": "requeue and the checkpoint settings", "default_root_dir": "output_dir"}

#: keys that moved, and where to
RENAMED = {f"task.{key}": f"task.optimizer.{key}" for key in ("lr", "weight_decay", "momentum", "nesterov", "betas")}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def _inferred(default: Any) -> Accepts | None:
    kind = _kind(default)
    if kind == "null":
        return None
    if kind == "dict":
        return A("dict", "str") if "name" in default else A("dict")
    return A(kind)


def accepts_for(key: str, default: Any = None, has_default: bool = False) -> Accepts | None:
    """What ``key`` takes (None: anything)."""
    for pattern, accepts in KEY_TYPES.items():
        if fnmatch.fnmatchcase(key, pattern):
            return accepts
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "trainer" and parts[1] in TRAINER_ARGUMENTS:
        return TRAINER_ARGUMENTS[parts[1]]
    if component_kind(key) is not None:
        return A("str", "dict", "list", "null")
    return _inferred(default) if has_default else None


def component_kind(key: str) -> str | None:
    """The registry kind of the component a config key holds (None: not a component key).

    The top-level ``data`` / ``model`` / ``task`` nodes are chosen as config groups, not here.
    """
    from iresflow.registry import kind_of_parameter  # the registry module imports no torch

    if key.startswith("trainer.") or "." not in key:
        return None
    return kind_of_parameter(key.rsplit(".", 1)[-1])


def check_value(key: str, value: Any, accepts: Accepts | None, text: str | None = None) -> Any:
    """``value`` as ``key`` stores it; a ``ValueError`` saying what ``key`` takes otherwise.

    ``text``: the value as typed, kept for a text key given a number (``data.root=2024``).
    """
    if accepts is None:
        return value
    if isinstance(value, str) and value in accepts.words:
        return value
    kind = _kind(value)
    if kind in accepts.kinds:
        return value
    if kind == "int" and "float" in accepts.kinds:
        return float(value)
    if kind in ("int", "float") and "str" in accepts.kinds:
        return text if text is not None else str(value)
    if not accepts.kinds and not accepts.words:
        raise ValueError(f"{key} cannot be set in the config")
    shown = f"the text {value!r}" if kind == "str" else repr(value)
    raise ValueError(f"{key} takes {accepts.describe()}, not {shown}")
