"""``iresflow sweep SPEC``: run a W&B sweep spec locally, or hand it to ``wandb agent``.

A spec is exactly the YAML that ``wandb sweep`` accepts. Locally, without a W&B server, the
configurations are chosen as the W&B controller chooses them and every one runs as its own
process, resumable and stopped in order. One job a module:

- :mod:`~iresflow.sweep.spec`: load, validate, ``key=value`` overrides;
- :mod:`~iresflow.sweep.expand`: grid / random configurations like the W&B controller;
- :mod:`~iresflow.sweep.plan`: run ids, folders, command lines with the agent's macros;
- :mod:`~iresflow.sweep.outcome`: a run's standing from its folder (``status.json``) and the
  sweep's record of its attempts; what an exit code means;
- :mod:`~iresflow.sweep.processes`, :mod:`~iresflow.sweep.launcher`: the processes (own process
  group, death with the sweep), parallel slots, GPUs, timeouts, signals;
- :mod:`~iresflow.sweep.summary`, :mod:`~iresflow.sweep.plot`: CSV, Markdown, plot;
- :mod:`~iresflow.sweep.wandb_server`: register on the W&B server and run agents;
- :mod:`~iresflow.sweep.command`: the command line, :func:`add_arguments` and :func:`main`.
"""

from iresflow.sweep.command import CLI_DESCRIPTION, CLI_HELP, add_arguments, in_shard, main, parse_shard
from iresflow.sweep.expand import expand, swept_names
from iresflow.sweep.launcher import SweepResult, run_sweep
from iresflow.sweep.outcome import Attempt, RunResult, current_result
from iresflow.sweep.plan import Run, format_args, plan, render_command, run_id_of
from iresflow.sweep.plot import plot_summary
from iresflow.sweep.spec import SweepError, apply_overrides, load_spec, sweep_name, validate_spec
from iresflow.sweep.summary import write_summary
from iresflow.sweep.wandb_server import run_wandb

__all__ = [
    "SweepError", "Run", "RunResult", "Attempt", "SweepResult", "load_spec", "validate_spec", "apply_overrides",
    "expand", "swept_names", "sweep_name", "format_args", "render_command", "run_id_of", "plan", "run_sweep",
    "current_result", "write_summary", "plot_summary", "run_wandb", "add_arguments", "main", "parse_shard",
    "in_shard", "CLI_HELP", "CLI_DESCRIPTION",
]
