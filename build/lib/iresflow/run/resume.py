"""What a resume may change, and whether a checkpoint belongs to the run.

A resume composes its config from its own command line, like a start. It must equal the
run's ``config.yaml``, key by key, except for the keys in :data:`MAY_DIFFER`, which say
where the run is or how it is watched, never what it computes. Any other difference
refuses the resume (exit 2) with the list, unless ``resume_changes=allow``: then the
differences are recorded in the run's ``changes.yaml`` and ``config.yaml`` stays as it was.

A checkpoint is read and compared with the components the config builds before anything
is written: another task, another model or other shapes are refused.
"""

from __future__ import annotations

import fnmatch
import pickle
import zipfile
from pathlib import Path
from typing import Any

from iresflow.run.errors import RunDirError

__all__ = ["MAY_DIFFER", "differences", "describe_differences", "read_checkpoint", "check_checkpoint_fits"]

#: keys (fnmatch patterns) a resume may set differently without asking
MAY_DIFFER = ("ckpt_path", "output_dir", "overwrite", "resume_changes", "requeue", "checkpoint", "checkpoint.*",
              "data.num_workers", "trainer.enable_progress_bar", "trainer.enable_model_summary", "logger.mode")

_ABSENT = object()


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def differences(recorded: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (recorded value, new value)`` for every key that differs and may not."""
    old_flat, new_flat = _flatten(recorded), _flatten(new)
    out = {}
    for key in sorted(set(old_flat) | set(new_flat)):
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_DIFFER):
            continue
        old, value = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if old != value:
            out[key] = (None if old is _ABSENT else old, None if value is _ABSENT else value)
    return out


def describe_differences(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    items = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents on the CPU; a file that is not one is bad input, said in one line."""
    import torch

    path = Path(path)
    other = "use another checkpoint (a run's checkpoints/ folder holds last.ckpt and best.ckpt)"
    if not path.is_file():
        raise RunDirError(f"checkpoint {path} does not exist")
    try:
        whole = zipfile.is_zipfile(path)  # torch.save writes a zip archive; its index is at the end
    except OSError as err:
        raise RunDirError(f"checkpoint {path} cannot be read ({err.strerror or err}); {other}") from err
    if not whole:
        raise RunDirError(f"{path} is not a checkpoint, or a truncated one (no complete torch archive); {other}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except pickle.UnpicklingError as err:
        raise RunDirError(f"{path} holds objects other than tensors and plain values (not an iresflow "
                          f"checkpoint, or one from an older version); {other}") from err
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(f"{path} is damaged ({reason}); {other}") from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise RunDirError(f"{path} is not a Lightning checkpoint (it holds no state_dict)")
    return state


def check_checkpoint_fits(state: dict[str, Any], path: str | Path, task: Any, cfg: dict[str, Any]) -> None:
    """Refuse a checkpoint of another task, another model or other shapes than ``task``'s."""
    saved = state.get("iresflow_config") or {}
    for part in ("task", "model"):
        was = (saved.get(part) or {}).get("name")
        now = (cfg.get(part) or {}).get("name")
        if was is not None and now is not None and was != now:
            raise RunDirError(f"{path} is a checkpoint of {part} {was!r}, not of this run's {part} {now!r}; "
                              "resume it with its own settings, or start this run without ckpt_path")
    ours = {k: tuple(v.shape) for k, v in task.state_dict().items() if "_metrics" not in k}
    theirs = {k: tuple(v.shape) for k, v in state["state_dict"].items() if "_metrics" not in k}
    problems = [f"missing {k}" for k in ours if k not in theirs][:3]
    problems += [f"unexpected {k}" for k in theirs if k not in ours][:3]
    problems += [f"{k} has shape {theirs[k]}, the model {ours[k]}" for k in ours
                 if k in theirs and theirs[k] != ours[k]][:3]
    if problems:
        raise RunDirError(f"{path} does not fit the model this config builds ({'; '.join(problems)}); resume it "
                          "with the settings it was trained with")
