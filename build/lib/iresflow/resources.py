"""The folders that ship with iresflow: ``configs/``, the example plugins of ``registry/`` and ``sweeps/``.

In a checkout they are the repository's top-level folders. An installed package (a wheel,
``pip install .``, ``pip install git+...``) carries them as package data, ``iresflow/_configs``,
``iresflow/_plugins`` and ``iresflow/_sweeps`` (``pyproject.toml`` maps the folders there), found
through :mod:`importlib.resources`. A checkout is recognised by its ``pyproject.toml`` beside the
package, so code run from a checkout (editable install or ``PYTHONPATH``) uses that checkout's files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["SHIPPED", "shipped_folder"]

#: top-level folder of the repository -> its name inside the installed package
SHIPPED = {"configs": "_configs", "registry": "_plugins", "sweeps": "_sweeps"}


def shipped_folder(name: str) -> Path:
    """The folder ``name`` (``configs``, ``registry`` or ``sweeps``) of this installation."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / name).is_dir():
        return checkout / name
    # an installed package: a real folder on disk (wheels are unpacked; a zipped install is not supported)
    return Path(str(resources.files("iresflow").joinpath(SHIPPED[name])))
