"""Command-line arguments of the form ``key=value`` after the options.

argparse fills a ``nargs="*"`` positional only once, so in ``iresflow sweep SPEC --dry-run a=1``
the ``a=1`` after the option would be left unrecognised. :func:`collect_overrides` makes a
parser (also a subparser) put such leftovers into ``overrides``.
"""

from __future__ import annotations

import argparse

__all__ = ["collect_overrides"]


def collect_overrides(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser``, with ``key=value`` arguments left over by argparse appended to ``overrides``."""
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = plain(args, namespace)
        rest = []
        for a in extras:
            if "=" in a and not a.startswith("-"):
                ns.overrides = list(ns.overrides or []) + [a]
            else:
                rest.append(a)
        return ns, rest

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser
