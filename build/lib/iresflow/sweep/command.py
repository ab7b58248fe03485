"""The command line ``iresflow sweep SPEC [key=value ...] [options]`` (also ``python -m iresflow.sweep``).

Exit codes: 0 every run finished; 1 some run failed; 2 a bad request (one line saying what to
fix); 130 the sweep was stopped by SIGINT (Ctrl-C), 75 by SIGTERM or SIGHUP, or some run was
itself preempted: running the same command again resumes the interrupted runs.
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from iresflow.cliargs import collect_overrides
from iresflow.sweep.expand import swept_names
from iresflow.sweep.launcher import DEFAULT_GRACE, run_sweep
from iresflow.sweep.outcome import EXIT_INTERRUPTED, EXIT_PREEMPTED, Folder, RunResult, current_result
from iresflow.sweep.plan import Run, plan
from iresflow.sweep.spec import SweepError, apply_overrides, load_spec, sweep_name, validate_spec
from iresflow.sweep.summary import cell, write_summary

__all__ = ["add_arguments", "main", "parse_shard", "in_shard", "CLI_HELP", "CLI_DESCRIPTION", "DEFAULT_OUT_ROOT"]

DEFAULT_OUT_ROOT = Path("runs") / "sweeps"
CLI_HELP = "run a W&B sweep spec locally (or on the W&B server with --wandb)"
CLI_DESCRIPTION = """Run a W&B sweep spec (sweeps/*.yaml): every configuration as its own process,
a summary table (CSV + Markdown) and a plot of the metric; resumable.

examples:
  iresflow sweep sweeps/coeff.yaml --dry-run
  iresflow sweep sweeps/coeff_density.yaml --parallel 2 trainer.max_steps=3000
  iresflow sweep sweeps/series_length.yaml --gpus 0,1,2,3
  iresflow sweep sweeps/ablation_activation.yaml --wandb     # W&B server + wandb agent
  iresflow sweep sweeps/coeff.yaml --shard $SLURM_ARRAY_TASK_ID/5   # one of 5 array tasks

exit codes: 0 all runs finished; 1 some failed; 2 bad request; 130 stopped by Ctrl-C, 75 by
SIGTERM/SIGHUP or a run was preempted: run the same command again to resume."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``iresflow sweep`` (also used by ``python -m iresflow.sweep``)."""
    parser.add_argument("spec", help="W&B sweep spec (YAML), e.g. sweeps/coeff.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="key=value fixed for every run (replaces a swept parameter of that name), "
                             "e.g. trainer.max_steps=2000 data.root=/data")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their command lines; start nothing")
    parser.add_argument("--count", type=int, default=None,
                        help="random: number of runs (required); grid: run only the first N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search (default 0)")
    parser.add_argument("--parallel", type=int, default=None, metavar="K",
                        help="runs at a time (default 1, or one per GPU with --gpus)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids; each worker is pinned to one (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--out", default=None,
                        help=f"sweep folder (default {DEFAULT_OUT_ROOT}/<sweep name>); run i writes to <out>/<run_id>")
    parser.add_argument("--fresh", action="store_true",
                        help="start unfinished runs over (overwrite=true) instead of resuming them (ckpt_path=auto)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a run after this long (SIGTERM; it is marked failed)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                        help="after a stop (Ctrl-C, SIGTERM, --timeout): how long runs get to checkpoint and "
                             f"exit before SIGKILL (default {DEFAULT_GRACE:g})")
    parser.add_argument("--metrics", default="",
                        help="more metrics (comma-separated) for the Markdown table, e.g. test/recon_error")
    parser.add_argument("--summary-only", action="store_true",
                        help="rewrite the summary from the runs' files without starting anything")
    parser.add_argument("--wandb", action="store_true",
                        help="register the sweep on the W&B server and run `wandb agent` (needs a key + network)")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="run only the runs with index %% N == K (0 <= K < N): N workers (e.g. the tasks "
                             "of a SLURM job array) share one sweep folder; the summary lists every run")
    parser.add_argument("--sweep-id", default=None, metavar="ID",
                        help="with --wandb: join this registered sweep (ID or entity/project/ID) instead of "
                             "registering the spec again; one agent per allocation")
    parser.add_argument("--project", default=None, help="W&B project for --wandb (default: the spec's, or iresflow)")
    parser.add_argument("--entity", default=None, help="W&B entity for --wandb")

    return collect_overrides(parser)  # `SPEC --dry-run a=1`: a=1 is an override too


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise SweepError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4), not {text!r}")
    return int(m.group(1)), int(m.group(2))


def in_shard(run: Run, shard: tuple[int, int] | None) -> bool:
    return shard is None or run.index % shard[1] == shard[0]


def _plan_state(result: RunResult, fresh: bool) -> str:
    """What the next invocation will do with a run, for --dry-run."""
    if result.status == "cached":
        return "done, skipped"
    folder = Folder.read(result.run.output_dir)
    if fresh and folder.exists:
        return f"{result.status}, starts over (overwrite=true)"
    how = "resumes its checkpoint" if folder.has_checkpoint else "starts (no checkpoint yet)"
    if result.status == "pending":
        return how if folder.exists else "to run"
    return f"{result.status}, {how}"


def _print_plan(runs: list[Run], spec: dict[str, Any], out: Path, shard: tuple[int, int] | None,
                fresh: bool) -> None:
    swept = swept_names(spec)
    mine = f"; shard {shard[0]}/{shard[1]} runs {sum(in_shard(r, shard) for r in runs)} of them" if shard else ""
    print(f"sweep {sweep_name(spec)} ({spec['method']}): {len(runs)} runs -> {out}{mine}")
    fixed = {k: v for k, v in (runs[0].config.items() if runs else []) if k not in swept}
    if fixed:
        print("fixed: " + " ".join(f"{k}={cell(v)}" for k, v in fixed.items()))
    for r in runs:
        state = _plan_state(current_result(r), fresh) if in_shard(r, shard) else "another shard's"
        values = " ".join(f"{k}={cell(r.config.get(k))}" for k in swept)
        print(f"\n[{r.index + 1}] {r.run_id}  {values}  ({state})")
        print("    " + shlex.join(r.command))


def _parse(args: argparse.Namespace | Sequence[str] | None) -> argparse.Namespace:
    if isinstance(args, argparse.Namespace):
        return args
    parser = add_arguments(argparse.ArgumentParser(prog="iresflow sweep", description=CLI_DESCRIPTION,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser.parse_args(list(sys.argv[1:] if args is None else args))


def _stopped_code(sig: int) -> int:
    return EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_PREEMPTED


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``iresflow sweep``; returns the exit code (module docstring)."""
    args = _parse(args)
    try:
        spec = apply_overrides(load_spec(args.spec), args.overrides or [])
        validate_spec(spec, args.spec)
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        shard = parse_shard(args.shard)
        if args.sweep_id and not args.wandb:
            raise SweepError("--sweep-id joins a sweep on the W&B server; add --wandb")
        parallel = args.parallel or (len(gpus) if gpus else 1)
        if parallel < 1:
            raise SweepError("--parallel must be >= 1")
        if args.grace < 0 or (args.timeout is not None and args.timeout <= 0):
            raise SweepError("--grace must be >= 0 and --timeout > 0 (seconds)")
        if args.wandb:
            if args.dry_run:
                raise SweepError("--dry-run and --wandb: the server chooses the runs; drop --wandb to list them")
            if shard:
                raise SweepError("--shard splits a local sweep; with --wandb the server hands out the runs")
            from iresflow.sweep.wandb_server import run_wandb

            agents = run_wandb(spec, count=args.count, parallel=parallel, gpus=gpus, project=args.project,
                               entity=args.entity, sweep_id=args.sweep_id, grace=args.grace)
            if agents.stopped_by is not None:
                print(f"stopped by {signal.Signals(agents.stopped_by).name}; run the same command "
                      "(with --sweep-id) to continue the sweep", file=sys.stderr)
                return _stopped_code(agents.stopped_by)
            return agents.exit_code
        out = Path(args.out) if args.out else DEFAULT_OUT_ROOT / sweep_name(spec)
        runs = plan(spec, out, count=args.count, seed=args.seed, fresh=args.fresh)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        _print_plan(runs, spec, out.resolve(), shard, args.fresh)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    mine = [r for r in runs if in_shard(r, shard)]
    stopped_by = None
    now: dict[str, RunResult] = {}
    if not args.summary_only:
        launched = run_sweep(mine, name=sweep_name(spec), parallel=parallel, gpus=gpus, timeout=args.timeout,
                             grace=args.grace)
        stopped_by = launched.stopped_by
        now = {r.run_id: r for r in launched.runs}
    # the other shards' runs (and --summary-only) from their files
    results = [now.get(r.run_id) or current_result(r) for r in runs]
    extra = [m.strip() for m in (args.metrics or "").split(",") if m.strip()]
    paths = write_summary(results, spec, out, extra_metrics=extra)
    print(f"\nsummary: {paths['md']}\n         {paths['csv']}"
          + (f"\nplot:    {paths['png']}" if "png" in paths else ""))
    print(paths["md"].read_text().split("\n## ")[0])
    return _exit_code([r for r in results if in_shard(r.run, shard)], stopped_by)


def _exit_code(results: list[RunResult], stopped_by: int | None) -> int:
    interrupted = [r for r in results if r.status == "interrupted"]
    busy = [r for r in results if r.status == "busy"]
    if busy:
        print(f"{len(busy)} run(s) skipped: another live process owns their folder (exit 73)", file=sys.stderr)
    if stopped_by is not None:
        print(f"stopped by {signal.Signals(stopped_by).name}: {len(interrupted)} run(s) interrupted; "
              "run the same command again to continue the sweep", file=sys.stderr)
        return _stopped_code(stopped_by)
    if any(r.status == "failed" for r in results):
        return 1
    if interrupted:
        print(f"{len(interrupted)} run(s) interrupted (preempted); run the same command again to resume them",
              file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
