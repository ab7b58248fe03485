"""The plugin registry: every swappable component is registered by ``(kind, name)``.

A component is a class or a factory. Configs refer to it as a node
``{name: <registered name>, **params}``; :func:`build` turns such a node into an
object, and every mistake (an unknown kind, name or parameter) is answered with
the close matches and the list of what exists.

Discovery (see :func:`discover`): the built-ins register themselves on import,
third-party packages through the entry-point group ``iresflow.plugins``, and
every ``*.py`` in the plugin folders (the shipped examples of ``registry/``, the
``IRESFLOW_PLUGINS`` path list, and folders passed explicitly). Plugin files are imported under
stable names, ``iresflow.plugins.<file>_<digest of its folder>`` (:mod:`iresflow.plugins`), so
their objects survive pickling into a spawned process.

Names are resolved here and nowhere else. When a component is built, each of its
parameters that is named after a part kind (:data:`PART_KINDS`: ``estimator``,
``solver``, ``activation``, ...), or ends in ``_<kind>`` (``eval_estimator``), and
holds a node or a name becomes a :class:`Factory`: the component builds as many
fresh instances as it needs (one estimator per block) without looking anything up.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


__all__ = [
    "Entry",
    "RegistryError",
    "PluginImportError",
    "register",
    "available",
    "kinds",
    "get",
    "describe",
    "build",
    "build_node",
    "factory",
    "Factory",
    "PART_KINDS",
    "kind_of_parameter",
    "accepted_parameters",
    "missing_parameters",
    "instance",
    "discover",
]

ENTRY_POINT_GROUP = "iresflow.plugins"
#: kinds whose components are parts of other components (a plugin may add its own kind here);
#: ``model``, ``task`` and ``data`` are built by the run layer, never as parameters
PART_KINDS = {"activation", "residual", "normalization", "solver", "estimator", "trace", "block", "optimizer",
              "prior"}
PLUGIN_PATH_ENV = "IRESFLOW_PLUGINS"


class RegistryError(KeyError):
    """An unknown kind, name or parameter, or a duplicate registration."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginImportError(ImportError):
    """A plugin (file or entry point) that failed to import, named with its error."""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    obj: Callable[..., Any]
    description: str

    def parameters(self) -> dict[str, str]:
        """Accepted keyword parameters with their defaults, as printable strings."""
        params, _ = accepted_parameters(self.obj)
        return {name: "required" if p.default is p.empty else repr(p.default) for name, p in params.items()}


_REGISTRY: dict[str, dict[str, Entry]] = {}


def _signature(obj: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have no signature
        return inspect.Signature()


def accepted_parameters(obj: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """``(parameters, open)``: the keyword parameters ``obj`` accepts, and whether it takes any
    other keyword too. A class whose ``__init__`` passes ``**kwargs`` on to its base accepts
    the base's parameters as well (followed up the class hierarchy until an ``__init__``
    without ``**kwargs``), so a subclass need not repeat its base's signature."""
    params: dict[str, inspect.Parameter] = {}
    signatures = [_signature(obj)]
    if isinstance(obj, type):  # the bases' __init__, ours only: a library base's **kwargs are its own
        signatures += [_signature(k.__dict__["__init__"]) for k in obj.__mro__[1:]
                       if "__init__" in k.__dict__ and k.__module__.startswith("iresflow")]
    for sig in signatures:
        for p in sig.parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(p.name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, False
    return params, True


def _check_parameters(kind: str, name: str, obj: Callable[..., Any], given: Iterable[str]) -> None:
    accepted, open_ = accepted_parameters(obj)
    if open_:
        return
    for key in given:
        if key not in accepted:
            raise RegistryError(f"{kind} {name!r} has no parameter {key!r}" + _close_hint(key, accepted)
                                + f". Accepted: {', '.join(accepted) or '(none)'}.")


def missing_parameters(obj: Callable[..., Any], given: Iterable[str]) -> list[str]:
    """The required parameters of ``obj``'s own signature that ``given`` does not name (a base class's
    are not asked for: a subclass may pass them itself)."""
    named = set(given)
    return [p.name for p in _signature(obj).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name != "self" and p.name not in named]


def _suggest(word: str, choices: Iterable[str], what: str) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    msg = f"unknown {what} {word!r}."
    if close:
        msg += f" Did you mean {' or '.join(repr(c) for c in close)}?"
    msg += f" Available: {', '.join(choices) if choices else '(none)'}."
    return msg


def register(kind: str, name: str | None = None, *, description: str | None = None,
             override: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a class or factory under ``(kind, name)``.

    ``name`` defaults to the object's ``__name__`` in lower case; ``description``
    to the first line of its docstring. Registering a taken name is an error
    unless ``override=True``.
    """

    def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
        key = name or obj.__name__.lower()
        table = _REGISTRY.setdefault(kind, {})
        if key in table and not override and table[key].obj is not obj:
            where = getattr(table[key].obj, "__module__", "?")
            raise RegistryError(
                f"{kind} {key!r} is already registered (by {where}); "
                "pass override=True to replace it"
            )
        doc = description or (inspect.getdoc(obj) or "").strip().split("\n")[0]
        table[key] = Entry(kind, key, obj, doc)
        return obj

    return decorator


def kinds() -> list[str]:
    """All kinds that have at least one registered component."""
    _ensure_discovered()
    return sorted(_REGISTRY)


def available(kind: str, pattern: str = "*") -> list[str]:
    """Registered names of ``kind`` matching the fnmatch ``pattern``."""
    return sorted(fnmatch.filter(_table(kind), pattern))


def _table(kind: str) -> dict[str, Entry]:
    _ensure_discovered()
    if kind not in _REGISTRY:
        raise RegistryError(_suggest(kind, _REGISTRY, "component kind"))
    return _REGISTRY[kind]


def get(kind: str, name: str) -> Entry:
    """The registry entry for ``(kind, name)``; suggests close matches when unknown."""
    table = _table(kind)
    if name not in table:
        raise RegistryError(_suggest(name, table, f"{kind}"))
    return table[name]


def describe(kind: str | None = None) -> list[Entry]:
    """Entries of one kind, or of every kind, sorted: the catalogue."""
    selected = [kind] if kind is not None else kinds()
    return [get(k, n) for k in selected for n in available(k)]


def build(kind: str, name: str, /, **params: Any) -> Any:
    """Build the component ``(kind, name)`` with keyword ``params``.

    An unknown parameter is an error that names the accepted ones (unless the
    component takes ``**kwargs``).
    """
    entry = get(kind, name)
    _check_parameters(kind, name, entry.obj, params)
    missing = missing_parameters(entry.obj, params)
    if missing:  # said here, so that a TypeError from the constructor is always a bug inside it
        raise RegistryError(f"{kind} {name!r} needs the parameter{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}")
    return entry.obj(**_nested_factories(params))


def _close_hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_node(kind: str, node: Any, /, **defaults: Any) -> Any:
    """Build from a config node: a name string, or a mapping ``{name: ..., **params}``.

    ``defaults`` fill parameters the node does not set (e.g. a model passing its
    ``coeff`` down to every residual function). A node that is already a built
    object (not a string or mapping) is returned as is.
    """
    if not _is_node(node):
        return node
    name, params = _split_node(kind, node)
    entry = get(kind, name)
    accepted, open_ = accepted_parameters(entry.obj)
    merged = {k: v for k, v in defaults.items() if open_ or k in accepted}
    merged.update(params)
    return build(kind, name, **merged)


@dataclass(frozen=True)
class Factory:
    """A component node, checked and ready to build: every call builds a fresh instance.

    ``defaults`` given to the call fill parameters the node does not set (as in
    :func:`build_node`).
    """

    kind: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def __call__(self, **defaults: Any) -> Any:
        return build_node(self.kind, self.node(), **defaults)

    def node(self) -> dict[str, Any]:
        """The node this factory builds, ``{name: ..., **params}``."""
        return {"name": self.name, **dict(self.params)}

    def __repr__(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.params)
        return f"{self.kind}:{self.name}({params.lstrip(', ')})"


def factory(kind: str, node: Any, /) -> Factory:
    """A :class:`Factory` for a name or ``{name: ..., **params}`` node of ``kind``.

    The name and the parameter names are checked now, so a mistake is reported
    when the config is built, not when the first instance is needed.
    """
    if isinstance(node, Factory):
        return node
    if not _is_node(node):
        raise RegistryError(f"a {kind} must be a registered name or a {{name: ..., ...}} node, got {node!r}")
    name, params = _split_node(kind, node)
    _check_parameters(kind, name, get(kind, name).obj, params)
    return Factory(kind, name, tuple(params.items()))


def instance(spec: Any, /) -> Any:
    """A fresh component from what a constructor was given: a :class:`Factory` is
    called, a built object is copied (so that, e.g., every block gets its own
    estimator). Names are not looked up here: they are resolved by :func:`build`."""
    import copy

    if isinstance(spec, Factory):
        return spec()
    if _is_node(spec):
        raise TypeError(f"got the node {spec!r} where a built component or a Factory is expected: build "
                        "through iresflow.registry.build(...) (which resolves nodes), or pass "
                        "registry.factory(kind, node)")
    return copy.deepcopy(spec)


def kind_of_parameter(param: str) -> str | None:
    """The part kind a parameter named ``param`` takes: its own name or its ``_<kind>`` suffix."""
    for kind in sorted(PART_KINDS, key=len, reverse=True):
        if param == kind or param.endswith("_" + kind):
            return kind
    return None


def _names_a_component(value: Any) -> bool:
    """A name, or a mapping with a ``name`` key (a mapping without one is a plain setting)."""
    return isinstance(value, str) or (_is_node(value) and "name" in _to_container(value))


def _nested_factories(params: dict[str, Any]) -> dict[str, Any]:
    """Component parameters given as names or nodes become :class:`Factory` objects; a list whose
    every item is a name or a node (``block: [residual, implicit]``, one per stage) a list of them."""
    out = {}
    for key, value in params.items():
        kind = kind_of_parameter(key)
        if kind is not None and kind in _REGISTRY:
            if _names_a_component(value):
                value = factory(kind, value)
            elif isinstance(value, (list, tuple)) and value and all(_names_a_component(v) for v in value):
                value = [factory(kind, v) for v in value]
        out[key] = value
    return out


def _is_node(node: Any) -> bool:
    """A component given by name or as a ``{name: ..., **params}`` mapping (not yet built)."""
    return isinstance(node, (str, Mapping)) or _is_dictconfig(node)


def _split_node(kind: str, node: Any) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` of a name or a ``{name: ..., **params}`` node."""
    if isinstance(node, str):
        return node, {}
    params = dict(_to_container(node))
    if "name" not in params:
        raise RegistryError(f"a {kind} node needs a 'name' key, got keys {sorted(params)}")
    return params.pop("name"), params


def _is_dictconfig(node: Any) -> bool:
    return type(node).__name__ == "DictConfig"


def _to_container(node: Any) -> Mapping[str, Any]:
    if _is_dictconfig(node):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return node


# --------------------------------------------------------------------------- discovery

_discovered = False
_loaded_files: set[Path] = set()
_loaded_entry_points: set[str] = set()


def _ensure_discovered() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        discover()


def _builtins() -> None:
    # Importing these modules runs their @register decorators.
    for module in ("iresflow.nn", "iresflow.models", "iresflow.tasks", "iresflow.data"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            # A sub-package not (yet) present is fine; a missing dependency is not.
            if err.name != module:
                raise


def plugin_dirs(extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """The plugin folders: the example plugins (``registry/``), ``$IRESFLOW_PLUGINS``, then ``extra``."""
    from iresflow.resources import shipped_folder

    dirs: list[Path] = []
    examples = shipped_folder("registry")  # the example plugins: the checkout's registry/, or shipped
    if examples.is_dir():
        dirs.append(examples)
    for part in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep):
        if part:
            dirs.append(Path(part).expanduser())
    dirs.extend(Path(p).expanduser() for p in extra)
    return dirs


def load_plugin_file(path: str | os.PathLike[str]) -> None:
    """Import one plugin file (once), under its stable name (:mod:`iresflow.plugins`); a failure is
    raised naming the file."""
    from iresflow.plugins import module_name

    path = Path(path).resolve()
    if path in _loaded_files:
        return
    name = module_name(path)
    if name not in sys.modules:  # (a spawned process may have imported it already, unpickling)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginImportError(f"plugin {path} could not be loaded")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # report every failure by file, never swallow it
            del sys.modules[name]
            raise PluginImportError(f"plugin {path} failed to import: {type(err).__name__}: {err}") from err
    _loaded_files.add(path)


def discover(plugin_paths: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Register built-ins, entry-point plugins and every ``*.py`` in the plugin folders.

    Safe to call again (e.g. with the config's ``plugins`` list): what was
    loaded is not loaded twice. A folder that does not exist is an error only
    when named explicitly.
    """
    global _discovered
    _discovered = True
    _builtins()

    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"{ep.name}={ep.value}"
        if key in _loaded_entry_points:
            continue
        try:
            ep.load()
        except Exception as err:
            raise PluginImportError(
                f"entry-point plugin {ep.name!r} ({ep.value}) failed to import: "
                f"{type(err).__name__}: {err}"
            ) from err
        _loaded_entry_points.add(key)

    explicit = [Path(p).expanduser() for p in plugin_paths]
    # Processes started from this one (spawned DDP ranks, DataLoader workers, sweep runs) inherit the
    # folders, so they can import the plugin modules by name (iresflow.plugins).
    inherited = [p for p in os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if p]
    for folder in explicit:
        if str(folder.resolve()) not in inherited and folder.is_dir():
            inherited.append(str(folder.resolve()))
    if inherited:
        os.environ[PLUGIN_PATH_ENV] = os.pathsep.join(inherited)
    for folder in plugin_dirs(explicit):
        if not folder.is_dir():
            if folder in explicit or str(folder) in os.environ.get(PLUGIN_PATH_ENV, ""):
                raise PluginImportError(f"plugin folder {folder} does not exist")
            continue
        for file in sorted(folder.glob("*.py")):
            if not file.name.startswith("_"):
                load_plugin_file(file)
