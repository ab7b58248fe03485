"""Run configuration: compose ``configs/`` groups, apply command-line overrides, validate.

A run's config is ``configs/train.yaml`` plus one file from each group
(``data/``, ``model/``, ``task/``, ``trainer/``, ``logger/``) and optionally an
``experiment/`` file, which is applied last and may change the other groups'
choices (its own ``defaults:`` list) and any key (its body is merged at the
top level). Command-line overrides come in three forms:

- ``group=name`` picks a file of a group (``data=mnist``, ``logger=none``,
  ``experiment=mnist_classify``); a group chosen on the command line wins over
  the experiment's choice;
- ``a.b.c=value`` sets an existing key (an unknown key is an error that
  suggests the close matches);
- ``+a.b=value`` adds a new key.

Values are parsed like YAML (numbers, ``true``/``false``, ``null``, ``[lists]``),
with ``1e-3`` read as a number, and checked against the key's type
(:mod:`iresflow.schema`: ``model.coeff=abc`` is an error here, before anything is
built or imported). Setting the ``name`` of a component node
(``model.estimator.name=power_series``, or the shorthand
``model.estimator=power_series``) switches the component and keeps only the
node's parameters that the new component accepts.

``n_terms`` means the same to every series estimator: the number of terms
computed exactly (the whole truncated series for ``power_series``; the terms
before the random tail for ``russian_roulette``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from iresflow import schema

__all__ = [
    "ConfigError",
    "GROUPS",
    "config_dir",
    "load_config",
    "apply_overrides",
    "parse_value",
    "group_options",
    "to_yaml",
]

#: groups in the order they are composed; ``experiment`` is applied last
GROUPS = ("data", "model", "task", "trainer", "logger", "experiment")
CONFIG_DIR_ENV = "IRESFLOW_CONFIG_DIR"

# config paths whose node is a registered component of a kind (beyond <kind> itself as the last key)
_TOP_LEVEL_KINDS = {"data": "data", "model": "model", "task": "task"}


class ConfigError(ValueError):
    """A bad override, an unknown key or group, or an invalid config."""


def config_dir() -> Path:
    """The folder holding ``train.yaml`` and the group folders: ``$IRESFLOW_CONFIG_DIR`` (also set
    by ``iresflow --config-dir DIR``) when set, else the configs shipped with the package."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env).expanduser()
    from iresflow.resources import shipped_folder

    return shipped_folder("configs")


def group_options(group: str, root: Path | None = None) -> list[str]:
    """The names of the files of one group (without ``.yaml``)."""
    folder = (root or config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


# --------------------------------------------------------------------------- values

def _numberish(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; a number is what anyone typing it means."""
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return value
        if value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
            return f
        return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f
    if isinstance(value, list):
        return [_numberish(v) for v in value]
    if isinstance(value, dict):
        return {k: _numberish(v) for k, v in value.items()}
    return value


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``null``, ``true``, ``[1, 2]``), numbers as numbers."""
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return value  # quoted: keep the string as typed
    return _numberish(value)


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # a YAML syntax error names the file
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if cfg is None:
        return OmegaConf.create({})
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping, not a {type(cfg).__name__}")
    return cfg


def _group_file(group: str, name: str, root: Path) -> Path:
    path = root / group / f"{name}.yaml"
    if not path.is_file():
        options = group_options(group, root)
        raise ConfigError(f"unknown {group} config {name!r}.{_suggest(name, options)} "
                          f"Available {group} configs: {', '.join(options) or '(none)'} (in {root / group}).")
    return path


def _defaults_list(cfg: DictConfig, where: str) -> dict[str, str | None]:
    """Pop a Hydra-style ``defaults:`` list (``- group: name``) into an ordered mapping."""
    if "defaults" not in cfg:
        return {}
    raw = OmegaConf.to_container(cfg.defaults)
    del cfg["defaults"]
    choices: dict[str, str | None] = {}
    for item in raw or []:
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{where}: each 'defaults' entry must be '- group: name', got {item!r}")
        (group, name), = item.items()
        if group not in GROUPS:
            raise ConfigError(f"{where}: unknown config group {group!r}.{_suggest(group, GROUPS)}")
        choices[group] = name
    return choices


# --------------------------------------------------------------------------- overrides

class _Override:
    __slots__ = ("text", "key", "value", "raw", "add", "delete")

    def __init__(self, text: str):
        self.text = text
        self.add = text.startswith("+")
        self.delete = text.startswith("~")
        body = text[1:] if (self.add or self.delete) else text
        if self.delete:
            self.key, self.value, self.raw = body.split("=", 1)[0], None, None
        else:
            if "=" not in body:
                raise ConfigError(f"bad override {text!r}: expected key=value, group=name or +key=value")
            self.key, self.raw = body.split("=", 1)
            self.value = parse_value(self.raw)
        if not self.key or any(not part for part in self.key.split(".")):
            raise ConfigError(f"bad override {text!r}: empty key")

    @property
    def is_group(self) -> bool:
        return not self.add and not self.delete and "." not in self.key and self.key in GROUPS


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k!s}"
            keys.append(full)
            keys.extend(_all_keys(_child(node, k), full + "."))
    return keys


def _child(node: DictConfig | ListConfig, key: Any) -> Any:
    """A child without resolving it: an interpolation or a missing value (``???``) is a leaf here."""
    if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
        return None
    return node[key]


def _unknown_key(cfg: DictConfig, key: str) -> ConfigError:
    if key in schema.RENAMED:
        return ConfigError(f"{key} is now {schema.RENAMED[key]}: the optimiser is a component node "
                           f"(task.optimizer: {{name: adam, lr: ...}}); set {schema.RENAMED[key]}=...")
    keys = _all_keys(cfg)
    hint = _suggest(key, keys)
    if not hint:  # a typo in the last part only: compare with the siblings' full names
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = [k for k in keys if k.rsplit(".", 1)[0] == parent] if parent else []
        hint = _suggest(key, siblings)
    return ConfigError(f"unknown config key {key!r}.{hint} Use +{key}=... to add a new key.")


def _kind_of(path: str) -> str | None:
    """Which registry kind the node at ``path`` is (``model.estimator`` -> estimator)."""
    if path in _TOP_LEVEL_KINDS:
        return _TOP_LEVEL_KINDS[path]
    return schema.component_kind(path)


def _promote_component(cfg: DictConfig, key: str) -> str | None:
    """For ``a.b.param`` where ``a.b`` is a component given by its name only (``activation: lipswish``):
    make ``a.b`` the node ``{name: lipswish}`` so that ``param`` can be set; returns ``a.b``."""
    path, _, _ = key.rpartition(".")
    if not path or _kind_of(path) is None or path in _TOP_LEVEL_KINDS or not _key_exists(cfg, path):
        return None
    current = OmegaConf.select(cfg, path)
    if not isinstance(current, str):
        return None
    OmegaConf.update(cfg, path, {"name": current}, merge=False, force_add=True)
    return path


def _check_component_parameter(cfg: DictConfig, path: str, leaf: str) -> None:
    """``leaf`` must be a parameter of the component at ``path`` (the registry says which)."""
    kind, name = _kind_of(path), OmegaConf.select(cfg, f"{path}.name")
    accepted = _accepted_params(str(kind), str(name), list(cfg.get("plugins") or []))
    if accepted is not None and leaf not in accepted:
        raise ConfigError(f"unknown config key '{path}.{leaf}': {kind} {name!r} has no parameter {leaf!r}."
                          f"{_suggest(leaf, accepted)} Accepted: {', '.join(sorted(accepted)) or '(none)'}.")


def _accepted_params(kind: str, name: str, plugins: Sequence[str]) -> set[str] | None:
    """Parameters the component accepts (None: any, it takes ``**kwargs``)."""
    from iresflow import registry

    registry.discover(plugins)
    try:
        entry = registry.get(kind, name)
    except registry.RegistryError as err:
        raise ConfigError(str(err)) from err
    accepted, open_ = registry.accepted_parameters(entry.obj)
    return None if open_ else set(accepted)


def _switch_component(cfg: DictConfig, path: str, new_name: str) -> None:
    """Set ``path.name`` and drop the node's parameters the new component does not accept."""
    node = OmegaConf.select(cfg, path)
    kind = _kind_of(path)
    plugins = list(cfg.get("plugins") or [])
    if not isinstance(node, DictConfig):
        OmegaConf.update(cfg, path, {"name": new_name}, merge=False)
        node = OmegaConf.select(cfg, path)
    old_name = node.get("name")
    node["name"] = new_name
    if kind is None or old_name == new_name or path in _TOP_LEVEL_KINDS:
        # top-level nodes (data/model/task) are switched with group=name; here only the name changes
        if kind is not None:
            _accepted_params(kind, new_name, plugins)  # an unknown name is an error now, not later
        return
    accepted = _accepted_params(kind, new_name, plugins)
    if accepted is None:
        return
    for key in [k for k in node.keys() if k != "name" and k not in accepted]:
        del node[key]


def apply_overrides(cfg: DictConfig, overrides: Sequence[str | _Override], *,
                    allow_groups: bool = False) -> DictConfig:
    """Apply ``key=value`` / ``+key=value`` / ``~key`` overrides to ``cfg`` (in place, returned).

    Group choices (``data=mnist``) are handled by :func:`load_config`; here they
    are an error unless ``allow_groups`` (then they are skipped).
    """
    parsed = [o if isinstance(o, _Override) else _Override(o) for o in overrides]
    # plugins first (they may register components named below), then component switches
    def order(o: _Override) -> int:
        if o.key == "plugins":
            return 0
        if o.key.endswith(".name") or (_kind_of(o.key) and isinstance(o.value, str)):
            return 1
        return 2

    OmegaConf.set_struct(cfg, False)
    promoted: set[str] = set()  # component names made nodes by these overrides
    for o in sorted(parsed, key=order):
        if o.is_group:
            if allow_groups:
                continue
            raise ConfigError(f"{o.text!r}: a config group cannot be chosen here; "
                              f"set its keys instead (e.g. {o.key}.name=...)")
        if o.delete:
            parent_path, _, leaf = o.key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
            if not isinstance(parent, DictConfig) or leaf not in parent:
                raise _unknown_key(cfg, o.key)
            del parent[leaf]
            continue
        exists = _key_exists(cfg, o.key)
        if not exists and not o.delete:
            # model.activation.beta=2 with `activation: lipswish`: the name becomes a node whose parameters
            # the registry knows (only here: a typo under a node of the config files needs no torch)
            parent = _promote_component(cfg, o.key) or (o.key.rpartition(".")[0] if o.key.rpartition(".")[0]
                                                        in promoted else None)
            if parent is not None:
                promoted.add(parent)
                if not o.key.endswith(".name"):
                    _check_component_parameter(cfg, parent, o.key.rsplit(".", 1)[1])
                    o.add = True
            exists = _key_exists(cfg, o.key)
        if not exists and not o.add and _is_trainer_argument(o.key):
            exists = False  # any lightning Trainer argument may be set without '+'
        elif not exists and not o.add:
            raise _unknown_key(cfg, o.key)
        if o.add and _key_exists(cfg, o.key):
            raise ConfigError(f"{o.text!r}: key {o.key!r} already exists; drop the '+' to change it")
        if o.key.endswith(".name") and _kind_of(o.key[: -len(".name")]) and isinstance(o.value, str):
            _switch_component(cfg, o.key[: -len(".name")], o.value)
            continue
        current = OmegaConf.select(cfg, o.key) if exists else None
        if isinstance(current, DictConfig) and "name" in current and isinstance(o.value, str) \
                and _kind_of(o.key):
            _switch_component(cfg, o.key, o.value)  # shorthand: model.estimator=power_series
            continue
        if isinstance(current, (DictConfig, ListConfig)):
            current = OmegaConf.to_container(current, resolve=True)
        OmegaConf.update(cfg, o.key, _typed(o, current, has_default=exists and not o.add), merge=False,
                         force_add=True)
    return cfg


def _typed(o: _Override, default: Any, has_default: bool) -> Any:
    """The override's value, checked against what its key takes (:mod:`iresflow.schema`)."""
    key = o.key
    if key.startswith("trainer.") and key.split(".", 1)[1] in schema.TRAINER_SET_BY_IRESFLOW:
        what = schema.TRAINER_SET_BY_IRESFLOW[key.split(".", 1)[1]]
        raise ConfigError(f"{key} is set by iresflow; use {what} instead")
    try:
        return schema.check_value(key, o.value, schema.accepts_for(key, default, has_default), o.raw)
    except ValueError as err:
        raise ConfigError(f"{o.text!r}: {err}") from None


def _is_trainer_argument(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 2 and parts[0] == "trainer" and parts[1] in schema.TRAINER_ARGUMENTS


def _key_exists(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node:
            node = _child(node, part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = _child(node, int(part))
        else:
            return False
    return True


# --------------------------------------------------------------------------- composition

def load_config(overrides: Sequence[str] = (), *, root: str | os.PathLike[str] | None = None) -> DictConfig:
    """Compose ``train.yaml`` + group files + experiment, then apply ``overrides``.

    Returns the resolved config (interpolations evaluated). Raises
    :class:`ConfigError` for unknown groups, group files, keys or bad syntax.
    """
    root = Path(root) if root is not None else config_dir()
    base_file = root / "train.yaml"
    if not base_file.is_file():
        raise ConfigError(f"no train.yaml in the config folder {root}: set ${CONFIG_DIR_ENV} or --config-dir to a "
                          "folder made by `iresflow config init DIR`")
    parsed = [_Override(o) for o in overrides]
    for o in parsed:  # an unknown group looks like an unknown top-level key
        if not o.add and not o.delete and "." not in o.key and o.key not in GROUPS \
                and isinstance(o.value, str) and (root / o.key).is_dir():
            raise ConfigError(f"{o.text!r}: {o.key!r} is not a config group")

    cfg = _load_yaml(base_file)
    choices = _defaults_list(cfg, str(base_file))
    cli_groups = {o.key: o.value for o in parsed if o.is_group}
    for group, value in cli_groups.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{group}={value!r}: a group takes the name of a file in {root / group}")

    experiment = cli_groups.get("experiment", choices.get("experiment"))
    if isinstance(experiment, str) and experiment.lower() in ("none", "null"):
        experiment = None
    exp_body = OmegaConf.create({})
    if experiment is not None:
        path = _group_file("experiment", experiment, root)
        exp_body = _load_yaml(path)
        choices.update(_defaults_list(exp_body, str(path)))
    choices.update({g: v for g, v in cli_groups.items() if g != "experiment"})

    for group in GROUPS[:-1]:
        name = choices.get(group)
        if name is None:
            raise ConfigError(f"no {group} config chosen; pass {group}=NAME "
                              f"(one of: {', '.join(group_options(group, root))})")
        cfg[group] = _load_yaml(_group_file(group, str(name), root))
    merged = OmegaConf.merge(cfg, exp_body)
    assert isinstance(merged, DictConfig)  # two mappings merge into a mapping
    cfg = merged
    cfg["experiment"] = experiment

    apply_overrides(cfg, parsed, allow_groups=True)
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:
        raise ConfigError(f"cannot resolve the config: {err}") from err
    validate(cfg)
    return cfg


REQUIRED = ("seed", "data", "model", "task", "trainer", "logger")


def validate(cfg: DictConfig) -> None:
    """Check the shape every run relies on (components are checked when they are built)."""
    for key in REQUIRED:
        if key not in cfg:
            raise ConfigError(f"the config has no {key!r} key")
    for key in ("data", "model", "task", "logger"):
        node = cfg[key]
        if not isinstance(node, DictConfig) or "name" not in node:
            raise ConfigError(f"config node {key!r} needs a 'name' key")
    if cfg.get("ckpt_path") is not None and not isinstance(cfg.get("ckpt_path"), str):
        raise ConfigError(f"ckpt_path must be null, auto, last or a path, not {cfg.ckpt_path!r}")
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig):
        for argument in trainer.keys():
            if argument not in schema.TRAINER_ARGUMENTS:
                raise ConfigError(f"trainer.{argument!s} is not a lightning Trainer argument."
                                  f"{_suggest(str(argument), schema.TRAINER_ARGUMENTS)}")
    for key in _all_keys(cfg):  # the keys with declared types, wherever their value came from
        value = OmegaConf.select(cfg, key)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        accepts = schema.accepts_for(key)
        if key.startswith("trainer.") and key.split(".", 1)[1] in schema.TRAINER_SET_BY_IRESFLOW:
            raise ConfigError(f"{key} is set by iresflow; use "
                              f"{schema.TRAINER_SET_BY_IRESFLOW[key.split('.', 1)[1]]} instead")
        if accepts is not None:
            try:
                schema.check_value(key, value, accepts)
            except ValueError as err:
                raise ConfigError(str(err)) from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

