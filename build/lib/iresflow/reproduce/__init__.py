"""``iresflow reproduce NAME``: the i-ResNet paper's figures and tables, one command each.

Targets (one module each; settings in ``configs/reproduce/<target>.yaml``):

- ``dynamics`` (Fig. 1): paths of points through a ResNet and an i-ResNet in 1D; crossings counted;
- ``toy`` (Fig. 2): learned 2D densities of an i-ResNet flow and the Glow baseline, test NLL;
- ``reconstruction`` (Fig. 3): digits, their inverse-of-forward at c = 0.9 and Vanilla's failed one;
- ``estimator`` (Fig. 4): bias and std of the log-det estimators against the number of terms;
- ``classification`` (Table 2): test error for Vanilla and c in {0.9, ..., 0.5}, through ``iresflow sweep``;
- ``density`` (Table 4): bits/dim of i-ResNet / Residual Flow / Glow configurations.

Each writes ``<target>.png``, ``<target>.md`` and ``<target>.json`` into ``--out`` (default
``results/<target>/``) at ``--scale cpu`` (default: minutes on a CPU), ``paper`` (a GPU) or
``tiny`` (seconds, for the tests). Deterministic for ``--seed``; resumable (a rerun skips what is
done; trained models are ordinary run folders under ``<out>/runs/``, which resume too).

Exit codes: 0 done, 1 a run failed, 2 bad input, 130 interrupted (rerun to resume).
Python API: :func:`add_arguments`, :func:`main`, :func:`run_target`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from iresflow.cliargs import collect_overrides
from iresflow.reproduce.common import SCALES, Context, ReproduceError

__all__ = ["TARGETS", "add_arguments", "main", "run_target", "CLI_HELP", "CLI_DESCRIPTION"]

#: target name (its module: iresflow.reproduce.<name>) -> what it reproduces
TARGETS = {
    "dynamics": "Fig. 1: ResNet vs i-ResNet paths in 1D (crossings)",
    "toy": "Fig. 2: learned 2D densities, i-ResNet vs Glow",
    "reconstruction": "Fig. 3: reconstructions at c = 0.9 and Vanilla's failed inverse",
    "estimator": "Fig. 4: log-det estimator bias and std vs number of terms",
    "classification": "Table 2: test error vs c and Vanilla (through iresflow sweep)",
    "density": "Table 4: bits/dim of i-ResNet / Residual Flow / Glow",
}
DEFAULT_ROOT = Path("results")

CLI_HELP = "reproduce a figure or table of the i-ResNet paper (PNG + Markdown + JSON)"
CLI_DESCRIPTION = """Reproduce one figure or table of the i-ResNet paper (Behrmann et al. 2019): trains what it
needs through the ordinary run machinery, then writes <target>.png, <target>.md and <target>.json
(every number, the settings, the wall times) into results/<target>/. Resumable: run it again.

targets:
""" + "\n".join(f"  {name:<15} {what}" for name, what in TARGETS.items()) + """
  all             every target, one after the other

examples:
  iresflow reproduce reconstruction                  # CPU scale, minutes
  iresflow reproduce all --scale tiny --out /tmp/r   # seconds each: a smoke test
  iresflow reproduce density --scale paper data.root=/data   # the paper's settings, a GPU"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``iresflow reproduce`` (also ``python -m iresflow.reproduce``)."""
    parser.add_argument("target", choices=[*TARGETS, "all"], metavar="TARGET",
                        help=f"one of {', '.join(TARGETS)}, or all")
    parser.add_argument("overrides", nargs="*",
                        help="key=value given to every training run (last, so they win), e.g. data.root=/data "
                             "trainer=gpu")
    parser.add_argument("--scale", choices=SCALES, default="cpu",
                        help="tiny (seconds, tests), cpu (default: minutes on a CPU), paper (the paper's settings)")
    parser.add_argument("--out", default=None,
                        help=f"results folder (default {DEFAULT_ROOT}/<target>; with all: <out>/<target>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run and of the analysis (default 0)")
    parser.add_argument("--fresh", action="store_true",
                        help="redo the analysis even when the table is up to date (finished runs are reused)")

    # key=value after an option (`toy --scale tiny data.root=x`) belongs to the overrides
    return collect_overrides(parser)


def run_target(name: str, *, scale: str = "cpu", out: str | Path | None = None, seed: int = 0,
               overrides: Sequence[str] = (), fresh: bool = False) -> dict[str, Any]:
    """Run one target; returns its result (the content of ``<target>.json``)."""
    if name not in TARGETS:
        raise ReproduceError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}", 2)
    ctx = Context(name, scale=scale, out=Path(out) if out else DEFAULT_ROOT / name, seed=seed,
                  overrides=list(overrides), fresh=fresh)
    if ctx.up_to_date():
        ctx.say(f"up to date: {ctx.out / (name + '.md')} (--fresh to redo the analysis)")
        from iresflow.reproduce.common import read_json

        return read_json(ctx.result_json)
    import torch

    # The analysis works on small tensors, where a second thread costs more than it saves
    # (the training runs choose their own: the `threads` key of the run config).
    torch.set_num_threads(int(ctx.settings.get("threads", 1)))
    torch.manual_seed(seed)
    module = importlib.import_module(f"iresflow.reproduce.{name}")
    result = module.run(ctx)
    ctx.say(f"wrote {ctx.out / (name + '.md')}, {ctx.out / result['figure']} ({result['wall_time_s']:.0f} s)")
    return result


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``iresflow reproduce``: the exit code (0 done, 1 a run failed, 2 bad input, 130 interrupted)."""
    if not isinstance(args, argparse.Namespace):
        parser = add_arguments(argparse.ArgumentParser(prog="iresflow reproduce", description=CLI_DESCRIPTION,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))
        args = parser.parse_args(list(sys.argv[1:] if args is None else args))
    names = list(TARGETS) if args.target == "all" else [args.target]
    start = time.perf_counter()
    try:
        for name in names:
            out = None if args.out is None else (Path(args.out) / name if args.target == "all" else Path(args.out))
            run_target(name, scale=args.scale, out=out, seed=args.seed, overrides=args.overrides or [],
                       fresh=args.fresh)
    except ReproduceError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        print(f"interrupted{': ' + str(err) if str(err) else ''}; run the same command again to resume",
              file=sys.stderr)
        return 130
    if len(names) > 1:
        print(f"all targets done in {time.perf_counter() - start:.0f} s")
    return 0
