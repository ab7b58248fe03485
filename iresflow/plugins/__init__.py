"""Plugin files as importable modules: ``iresflow.plugins.<file stem>_<folder digest>``.

A plugin file (``registry/tanh.py``, a file in an ``$IRESFLOW_PLUGINS`` folder or in the config's
``plugins`` list) is imported under a name that is the same in every process: its stem and the
first 8 hex digits of the SHA-1 of its folder's absolute path. A component defined in a plugin
then survives pickling into a spawned process (``trainer.strategy=ddp_spawn``, spawn DataLoader
workers): the child imports ``iresflow.plugins.tanh_1a2b3c4d`` like any module, through
:class:`PluginFinder`, which finds the file in the plugin folders (the shipped examples and
``$IRESFLOW_PLUGINS``, which :func:`iresflow.registry.discover` extends with the folders it was
given, so that child processes inherit them).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = ["module_name", "PluginFinder"]

PREFIX = __name__ + "."


def module_name(path: Path) -> str:
    """The stable module name of the plugin file ``path``."""
    path = Path(path).resolve()
    digest = hashlib.sha1(str(path.parent).encode()).hexdigest()[:8]
    return f"{PREFIX}{path.stem}_{digest}"


class PluginFinder(importlib.abc.MetaPathFinder):
    """Finds ``iresflow.plugins.<stem>_<digest>`` in the plugin folders."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(PREFIX):
            return None
        from iresflow.registry import plugin_dirs

        stem = fullname[len(PREFIX):].rpartition("_")[0]
        for folder in plugin_dirs():
            file = folder.expanduser().resolve() / f"{stem}.py"
            if file.is_file() and module_name(file) == fullname:
                return importlib.util.spec_from_file_location(fullname, file)
        return None


if not any(isinstance(f, PluginFinder) for f in sys.meta_path):
    sys.meta_path.append(PluginFinder())
