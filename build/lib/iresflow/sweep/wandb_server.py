"""The W&B server path: register the spec (``wandb.sweep``) and run ``wandb agent`` processes,
one per worker or GPU. The server chooses the runs (also ``bayes``); each agent starts them
from the spec's ``command``. Whether a key and the server are there is asked of
:mod:`iresflow.wandb_env`, before anything starts.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from iresflow import wandb_env
from iresflow.sweep.launcher import DEFAULT_GRACE, FORWARDED
from iresflow.sweep.processes import StopSignals, send, signal_group, spawn
from iresflow.sweep.spec import SweepError

__all__ = ["run_wandb", "start_agents", "AgentsResult"]


@dataclass(frozen=True)
class AgentsResult:
    """How the agents ended: the largest exit code, and the signal that stopped them (if any)."""

    exit_code: int
    stopped_by: int | None = None


def run_wandb(spec: dict[str, Any], *, count: int | None = None, parallel: int = 1,
              gpus: Sequence[str] | None = None, project: str | None = None, entity: str | None = None,
              register_timeout: float = 60.0, sweep_id: str | None = None,
              grace: float = DEFAULT_GRACE) -> AgentsResult:
    """Register ``spec`` on the W&B server and run ``wandb agent`` (one per worker / GPU).

    With ``sweep_id`` the sweep exists already (registered by an earlier call or by
    ``wandb sweep``): only the agents start, so every allocation of a cluster job can
    join the same sweep.
    """
    if not wandb_env.api_key_available():
        raise SweepError("--wandb needs a W&B API key: set WANDB_API_KEY or run `wandb login` "
                         "(no key in the environment or in ~/.netrc). Without --wandb the sweep runs "
                         "locally and its runs still log to W&B offline, grouped by the sweep name.")
    host, port = wandb_env.server()
    if not wandb_env.server_reachable(timeout=3.0):
        raise SweepError(f"--wandb: the W&B server {host}:{port} cannot be reached (no network?). "
                         "Run the sweep locally without --wandb, and `wandb sync` the offline runs later.")
    project = project or spec.get("project") or "iresflow"
    if not sweep_id:
        sweep_id = _register(spec, entity, project, register_timeout)
        print(f"sweep registered: {sweep_id} (join it from other machines with --sweep-id {sweep_id})", flush=True)
    return start_agents(sweep_id, entity, project, count, parallel, gpus, grace)


def _register(spec: dict[str, Any], entity: str | None, project: str, timeout: float) -> str:
    """``wandb.sweep`` with a time limit (it retries a refused connection for minutes)."""
    import wandb
    from wandb.errors import Error as WandbError

    outcome: dict[str, Any] = {}

    def register() -> None:
        try:
            outcome["id"] = wandb.sweep(spec, entity=entity, project=project)
        except (WandbError, OSError, ValueError) as err:  # refused, unreachable, or a spec it rejects
            outcome["error"] = err

    thread = threading.Thread(target=register, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise SweepError(f"--wandb: registering the sweep took longer than {timeout:g} s; giving up")
    if "error" in outcome:
        raise SweepError(f"--wandb: the W&B server refused the sweep: {outcome['error']}")
    if not outcome.get("id"):
        raise SweepError("--wandb: the W&B server returned no sweep id")
    return str(outcome["id"])


def start_agents(sweep_id: str, entity: str | None, project: str, count: int | None, parallel: int,
                 gpus: Sequence[str] | None, grace: float = DEFAULT_GRACE) -> AgentsResult:
    """``wandb agent`` processes for a registered sweep (one per worker / GPU) until they end;
    a stop signal is forwarded to them as to local runs (SIGKILL after ``grace`` s)."""
    # a full path entity/project/id may be given as the id
    path = sweep_id if sweep_id.count("/") == 2 else "/".join(p for p in (entity, project, sweep_id) if p)
    cmd = [sys.executable, "-m", "wandb", "agent"] + (["--count", str(count)] if count else []) + [path]
    env = dict(os.environ)
    # the agent runs `python` from PATH for ${interpreter}: make that this environment's Python
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    n = max(1, parallel, len(gpus or []))
    print(f"sweep {path}: starting {n} agent(s): {shlex.join(cmd)}", flush=True)
    with StopSignals() as signals:
        agents = []
        for i in range(n):
            agent_env = dict(env, CUDA_VISIBLE_DEVICES=gpus[i % len(gpus)]) if gpus else env
            agents.append(spawn(cmd, env=agent_env))
        kill_at, killed = None, False
        while any(a.poll() is None for a in agents):
            if signals.received and kill_at is None:
                for a in agents:
                    send(a, FORWARDED.get(signals.received[0], signal.SIGTERM))
                kill_at = time.monotonic() + grace
            if kill_at is not None and not killed and (time.monotonic() >= kill_at or len(signals.received) > 1):
                killed = True
                for a in agents:
                    signal_group(a.pid, signal.SIGKILL)
            time.sleep(0.1)
    code = max(a.poll() for a in agents)
    return AgentsResult(code, signals.received[0] if signals.received else None)
