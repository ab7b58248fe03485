"""Stable importable names for plugin files found in folders (``IRESFLOW_PLUGINS``, ``plugins:``).

A plugin file ``/a/b/mything.py`` is imported as ``iresflow._plugin_files._<hex of /a/b>.mything``:
the name says where the file is, so any process (a ``ddp_spawn`` worker, a DataLoader worker
started with ``spawn``) that unpickles one of its objects imports the same file again. Importing
this package installs the finder that turns ``_<hex>`` back into the folder; the file inside it is
then found by Python's own path finder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

__all__ = ["module_name"]


def module_name(file: Path) -> str:
    """The stable module name of the plugin file ``file`` (an absolute path)."""
    return f"{__name__}._{str(file.parent).encode().hex()}.{file.stem}"


class _FolderFinder(importlib.abc.MetaPathFinder):
    """``iresflow._plugin_files._<hex>`` -> a namespace package whose path is that folder."""

    prefix = __name__ + "._"

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if not fullname.startswith(self.prefix) or "." in fullname[len(self.prefix):]:
            return None
        try:
            folder = bytes.fromhex(fullname[len(self.prefix):]).decode()
        except ValueError:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [folder]
        return spec


if not any(isinstance(f, _FolderFinder) for f in sys.meta_path):
    sys.meta_path.append(_FolderFinder())
