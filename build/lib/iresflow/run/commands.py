"""The ``iresflow`` command line: ``train``, ``eval``, ``sample``, ``sweep``, ``reproduce``, ``registry list``,
``config show`` / ``config init``; :func:`main` returns the exit code (:mod:`iresflow.run.errors`).

An error is one line on stderr (``error: ...``) with the exit code it means; a traceback
only for what is not a known kind of failure, or when asked (``--debug`` or
``IRESFLOW_DEBUG=1``). Nothing here imports torch or Lightning until a command needs them,
so ``--help`` and a mistyped key are answered at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from iresflow.cliargs import collect_overrides
from iresflow.config import CONFIG_DIR_ENV, ConfigError, load_config, parse_value, to_yaml
from iresflow.run.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, RunFailed, Stopped, exit_code_of
from iresflow.run.paths import rank

__all__ = ["main", "parser"]

DEBUG_ENV = "IRESFLOW_DEBUG"
FMT = argparse.RawDescriptionHelpFormatter
EXIT_CODES_HELP = ("exit codes: 0 finished; 1 failed; 2 bad input (one line says what to fix); 73 the run folder "
                   "is in use by another process; 75 preempted (SIGTERM/SIGUSR1: checkpoint written, resume with "
                   "ckpt_path=auto); 130 interrupted by Ctrl-C (checkpoint written). --debug or IRESFLOW_DEBUG=1: "
                   "tracebacks.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iresflow", description="Invertible residual networks and residual flows on PyTorch Lightning.",
        formatter_class=FMT,
        epilog="Overrides: group=name (data=mnist, logger=none, experiment=mnist_classify), "
               "a.b.c=value (model.coeff=0.9), +a.b=value (new key).\n" + EXIT_CODES_HELP)
    p.add_argument("--debug", action="store_true", help="print tracebacks (also IRESFLOW_DEBUG=1)")
    p.add_argument("--config-dir", metavar="DIR",
                   help="use the configs in DIR instead of the shipped ones (also $IRESFLOW_CONFIG_DIR; "
                        "`iresflow config init DIR` makes such a folder)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a model (no overrides: the 2D toy density run)", formatter_class=FMT,
                       description="Train one run. Without overrides: a 2D density (8 Gaussians), a few minutes "
                                   "on a laptop CPU, with a picture of the learned density.\n\nexamples:\n"
                                   "  iresflow train\n  iresflow train experiment=mnist_classify data.root=DIR\n"
                                   "  iresflow train model.coeff=0.9 model.estimator.name=power_series "
                                   "model.estimator.n_terms=8\n"
                                   "  iresflow train output_dir=runs/x ckpt_path=auto   # start, or resume\n\n"
                                   + EXIT_CODES_HELP)
    t.add_argument("overrides", nargs="*", help="group=name, a.b=value or +a.b=value")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks")
    collect_overrides(t)  # `train a=1 --debug b=2`: b=2 is an override too

    e = sub.add_parser("eval", help="test metrics of a checkpoint to JSON", formatter_class=FMT,
                       description="Evaluate a checkpoint on the test set (bits/dim with the evaluation "
                                   "estimator, accuracy, reconstruction error); writes JSON.\n\nexample:\n"
                                   "  iresflow eval ckpt=runs/toy2d_density/DATE/checkpoints/last.ckpt")
    e.add_argument("overrides", nargs="*", help="ckpt=PATH (required), out=FILE.json, a.b=value ...")
    e.add_argument("--ckpt", help="checkpoint file (same as ckpt=PATH)")
    e.add_argument("--out", help="JSON file to write (default <run>/eval_<ckpt>.json)")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks")
    collect_overrides(e)

    s = sub.add_parser("sample", help="draw samples through the inverse (PNG)", formatter_class=FMT,
                       description="Sample from a density checkpoint: a PNG grid (images) or a scatter (2D)."
                                   "\n\nexample:\n  iresflow sample ckpt=runs/.../last.ckpt n=64")
    s.add_argument("overrides", nargs="*", help="ckpt=PATH (required), n=64, out=FILE.png, temperature=1.0, "
                                                "seed=0, a.b=value ...")
    s.add_argument("--ckpt")
    s.add_argument("-n", default=None, help="number of samples (same as n=N)")
    s.add_argument("--out")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks")
    collect_overrides(s)

    r = sub.add_parser("registry", help="the registered components", formatter_class=FMT,
                       description="registry list [KIND]: every registered component with its description "
                                   "and parameters.")
    r_sub = r.add_subparsers(dest="action", metavar="ACTION")
    r_sub.required = True
    rl = r_sub.add_parser("list", help="list components (of one kind)")
    rl.add_argument("kind", nargs="?", help="activation, residual, solver, estimator, optimizer, model, task, data")
    rl.add_argument("--plugins", nargs="*", default=[], help="extra plugin folders")

    c = sub.add_parser("config", help="show the composed config, or copy the shipped configs to edit",
                       formatter_class=FMT,
                       description="config show [overrides]: print the resolved config of a run.\n"
                                   "config init DIR: copy the shipped configs into DIR (existing files are "
                                   "kept unless --force); then use them with --config-dir DIR or "
                                   "IRESFLOW_CONFIG_DIR=DIR.")
    c_sub = c.add_subparsers(dest="action", metavar="ACTION")
    c_sub.required = True
    cs = c_sub.add_parser("show", help="print the resolved config")
    cs.add_argument("overrides", nargs="*")
    collect_overrides(cs)
    ci = c_sub.add_parser("init", help="copy the shipped configs into a folder, to edit and use with --config-dir")
    ci.add_argument("folder", help="the folder to write (made if missing)")
    ci.add_argument("--force", action="store_true", help="replace files that exist (default: keep them)")

    from iresflow import sweep as _sweep

    w = sub.add_parser("sweep", help=_sweep.CLI_HELP, description=_sweep.CLI_DESCRIPTION, formatter_class=FMT)
    _sweep.add_arguments(w)

    from iresflow import reproduce as _reproduce

    rp = sub.add_parser("reproduce", help=_reproduce.CLI_HELP, description=_reproduce.CLI_DESCRIPTION,
                        formatter_class=FMT)
    _reproduce.add_arguments(rp)
    return p


# --------------------------------------------------------------------------- commands

def _pop_keys(overrides: Sequence[str], keys: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    found, rest = {}, []
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in keys and "=" in o:
            found[key] = o.split("=", 1)[1]
        else:
            rest.append(o)
    return found, rest


def _number(name: str, text: str, kind: type) -> float | int:
    value = parse_value(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}={text}: expected {what}")
    return kind(value)


def _cmd_train(args: argparse.Namespace) -> int:
    from iresflow.run.training import train

    result = train(load_config(args.overrides), command=args.overrides)
    if rank() == 0:
        if result.note:
            print(result.note)
        print("\nfinal metrics:")
        for key in sorted(result.metrics):
            value = result.metrics[key]
            print(f"  {key:<32} {value:.6g}" if isinstance(value, float) else f"  {key:<32} {value}")
        final = [p for p in result.pictures if p.parent == result.run_dir] or result.pictures[-1:]
        print(f"\nrun folder: {result.run_dir}")
        for p in final:
            print(f"picture: {p}")
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from iresflow.run.evaluation import evaluate

    found, rest = _pop_keys(args.overrides, ("ckpt", "out"))
    ckpt = args.ckpt or found.get("ckpt")
    if not ckpt:
        raise ConfigError("eval needs ckpt=PATH (a .ckpt file, e.g. runs/NAME/DATE/checkpoints/last.ckpt)")
    result = evaluate(ckpt, rest, out=args.out or found.get("out"))
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(f"written: {result.path}")
    return EXIT_OK


def _cmd_sample(args: argparse.Namespace) -> int:
    from iresflow.run.evaluation import sample

    found, rest = _pop_keys(args.overrides, ("ckpt", "n", "out", "temperature", "seed"))
    ckpt = args.ckpt or found.get("ckpt")
    n = _number("n", args.n if args.n is not None else found.get("n", "64"), int)
    temperature = _number("temperature", found.get("temperature", "1.0"), float)
    seed = int(_number("seed", found["seed"], int)) if "seed" in found else None
    if n < 1:
        raise ConfigError(f"n={n}: the number of samples must be at least 1 (e.g. n=64)")
    if not ckpt:
        raise ConfigError("sample needs ckpt=PATH (a .ckpt file of a density run)")
    path = sample(ckpt, int(n), rest, out=args.out or found.get("out"), temperature=float(temperature), seed=seed)
    print(f"samples: {path}")
    return EXIT_OK


def _cmd_registry(args: argparse.Namespace) -> int:
    from iresflow import registry

    registry.discover(args.plugins)
    current = None
    for entry in registry.describe(args.kind):
        if entry.kind != current:
            current = entry.kind
            print(f"\n[{current}]")
        print(f"  {entry.name:<22} {entry.description}")
        params = entry.parameters()
        if params:
            print("      " + ", ".join(f"{k}={v}" for k, v in params.items()))
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    if args.action == "init":
        return _config_init(Path(args.folder).expanduser(), force=bool(args.force))
    print(to_yaml(load_config(args.overrides)), end="")
    return EXIT_OK


def _config_init(folder: Path, force: bool) -> int:
    """Copy every shipped config file into ``folder``; existing files are kept unless ``force``."""
    import shutil

    from iresflow.resources import shipped_folder

    source = shipped_folder("configs")
    written, kept = [], []
    for file in sorted(source.rglob("*")):
        if not file.is_file() or file.suffix not in (".yaml", ".md"):
            continue
        target = folder / file.relative_to(source)
        if target.exists() and not force:
            kept.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        written.append(target)
    print(f"{len(written)} config files written to {folder}" + (f", {len(kept)} existing ones kept "
          "(--force replaces them)" if kept else ""))
    print(f"use them with: iresflow --config-dir {folder} train ...   (or IRESFLOW_CONFIG_DIR={folder})")
    return EXIT_OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    from iresflow import sweep as _sweep

    return _sweep.main(args)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from iresflow import reproduce as _reproduce

    return _reproduce.main(args)


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample, "registry": _cmd_registry,
            "config": _cmd_config, "sweep": _cmd_sweep, "reproduce": _cmd_reproduce}


# --------------------------------------------------------------------------- errors

def _one_line(text: object) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report(err: BaseException, debug: bool) -> int:
    """Print ``err`` the way its exit code wants; return the code."""
    code = exit_code_of(err)
    known = code != EXIT_FAILED or isinstance(err, (RunFailed, FloatingPointError))
    if debug or not known:
        traceback.print_exception(err)
    if isinstance(err, Stopped):
        if not err.announced:  # (a requeued run printed it before the requeue)
            print(_one_line(err), file=sys.stderr)
    elif isinstance(err, KeyboardInterrupt):
        print("interrupted (Ctrl-C)", file=sys.stderr)
    else:
        message = _one_line(err) or type(err).__name__
        prefix = "" if known else f"{type(err).__name__}: "
        hint = "" if known or debug else " (the traceback is above; IRESFLOW_DEBUG=1 shows it for every error)"
        print(f"error: {prefix}{message}{hint}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (0 on success)."""
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "train":  # a scheduler's signal during the imports: recorded, acted on by the run
        from iresflow.run import early_signals

        early_signals.install()
    if args.config_dir:  # (in the environment: sweep and reproduce runs, DDP ranks inherit it)
        folder = Path(args.config_dir).expanduser().resolve()
        if not (folder / "train.yaml").is_file():
            print(f"error: --config-dir {folder} holds no train.yaml; make one with `iresflow config init "
                  f"{args.config_dir}`", file=sys.stderr)
            return EXIT_BAD_INPUT
        os.environ[CONFIG_DIR_ENV] = str(folder)
    debug = bool(args.debug) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except SystemExit:
        raise
    except BaseException as err:  # every failure becomes an exit code, said in one line
        return report(err, debug)

