"""Where the shipped configs and example plugins are.

The repository's top-level folders ``configs/`` and ``registry/`` are installed as the
subpackages ``iresflow._configs`` and ``iresflow._plugins`` (``pyproject.toml`` maps them), so a
wheel, ``pip install git+URL`` and the editable install all find them through
:mod:`importlib.resources`. Only a source tree used without installing it (``PYTHONPATH=checkout``)
has no such subpackages. A source checkout (the package's parent folder holds iresflow's own
``pyproject.toml``) uses its own folders first, so that a second checkout on ``PYTHONPATH`` never
reads the configs of another one installed in editable mode; a bare ``site-packages/configs`` of
another package is never taken for ours.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

__all__ = ["CONFIGS_PACKAGE", "PLUGINS_PACKAGE", "shipped_configs", "shipped_plugins", "installed_plugins"]

CONFIGS_PACKAGE = "iresflow._configs"
PLUGINS_PACKAGE = "iresflow._plugins"
_CHECKOUT_FOLDERS = {CONFIGS_PACKAGE: "configs", PLUGINS_PACKAGE: "registry"}


def _package_folder(package: str) -> Path | None:
    """The folder of an installed subpackage (None: not installed, or not on a file system)."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        return None
    if spec is None:
        return None
    folder = importlib.resources.files(package)
    return folder if isinstance(folder, Path) and folder.is_dir() else None


def _checkout_folder(package: str) -> Path | None:
    root = Path(__file__).resolve().parent.parent
    folder = root / _CHECKOUT_FOLDERS[package]
    try:
        ours = 'name = "iresflow"' in (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return folder if ours and folder.is_dir() else None


def installed_plugins() -> Path | None:
    """The folder of ``iresflow._plugins`` when it is importable (its modules have that prefix)."""
    folder = _package_folder(PLUGINS_PACKAGE)
    return folder.resolve() if folder is not None else None


def shipped_configs() -> Path | None:
    """The folder of the shipped ``train.yaml`` and config groups."""
    return _checkout_folder(CONFIGS_PACKAGE) or _package_folder(CONFIGS_PACKAGE)


def shipped_plugins() -> Path | None:
    """The folder of the shipped example plugins."""
    return _checkout_folder(PLUGINS_PACKAGE) or _package_folder(PLUGINS_PACKAGE)
