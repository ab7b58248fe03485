"""The ``iresflow`` console script; the command line itself is :mod:`iresflow.run.commands`."""

from iresflow.run.commands import main

__all__ = ["main"]
