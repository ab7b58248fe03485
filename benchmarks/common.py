"""Shared machinery of the benchmarks: the run context, timing, peak memory,
machine information and target bookkeeping.

Timing rules (why the numbers can be trusted on a noisy, shared machine):

- every timed call is bracketed by a device synchronisation (CUDA kernels are
  asynchronous, a wall clock without a sync measures the launch only);
- two implementations are timed *interleaved*, A B B A A B ..., never in two
  separate loops, so a slow phase of the machine hits both; a ratio is taken
  per pair and the median over pairs is reported (robust to outliers);
- warm-up calls run first (lazy initialisation, data-dependent ActNorm init,
  optimizer state, allocator caches).

Peak memory is the allocator's high-water mark above what was live before the
step (parameters, optimizer state, inputs): ``torch.cuda.max_memory_allocated``
on CUDA; on CPU the allocation/free events recorded by ``torch.profiler``
(``profile_memory=True``), replayed in time order. Both count exactly the
tensors a step allocates; neither counts Python objects or allocator slack.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


# --------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every benchmark gets: where to run, how long, where to write."""

    device: torch.device
    quick: bool = False
    out_dir: str = "benchmarks/results"
    seed: int = 0
    profile: bool = False
    verbose: bool = True
    notes: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  {msg}", flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, device-synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def iqr(xs):
    if len(xs) < 4:
        return [float(min(xs)), float(max(xs))] if xs else [float("nan")] * 2
    q = statistics.quantiles(xs, n=4)
    return [float(q[0]), float(q[2])]


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, *, pairs: int,
                warmup: int = 2, steps_per_sample: int = 1) -> dict[str, list[float]]:
    """Time several callables interleaved; returns seconds per call, per round.

    The order within a round alternates (A B, then B A) so that neither side
    always runs right after the other (cache / frequency effects).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}

    def many(f):
        def g():
            for _ in range(steps_per_sample):
                f()
        return g

    for r in range(pairs):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(timed(many(fns[n]), device) / steps_per_sample)
    return times


def pair_ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios num[i] / den[i] (e.g. reference time / iresflow time = speed-up)."""
    return [a / b for a, b in zip(num, den) if b > 0]


def summarize_times(ts: list[float]) -> dict:
    return {"median_s": median(ts), "iqr_s": iqr(ts), "min_s": float(min(ts)), "n": len(ts)}


# --------------------------------------------------------------------------- memory
def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated at the high-water mark of ``fn()`` above what was live before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak_memory(fn)


def _cpu_peak_memory(fn: Callable[[], Any]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    allocs.sort()
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return int(peak)


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``fn()``.

    A second, allocator-independent view of the memory a graph keeps (storages
    counted once even when saved by several nodes).
    """
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # noqa: BLE001 - sparse / meta tensors: skip
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(seen.values()))


# --------------------------------------------------------------------------- info
def machine_info(device: torch.device) -> dict:
    info = {
        "hostname_hash": hash(platform.node()) & 0xFFFF,  # distinguishes machines without naming them
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import psutil  # optional

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        try:
            info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        except Exception:  # noqa: BLE001
            pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    import sys

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("iresflow", "normflows", "numpy", "matplotlib"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            out[mod] = None
    try:
        import subprocess

        out["iresflow_git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["iresflow_git"] = None
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- targets
def target(name: str, value: float | None, op: str, threshold: float, *, unit: str = "",
           description: str = "") -> dict:
    """One pass/fail line. ``op`` in {'>=', '<=', '<'}; a missing value fails."""
    ok = None
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        ok = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold,
              ">": value > threshold}[op]
    return {"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit,
            "passed": bool(ok) if ok is not None else False, "description": description}


def jsonable(obj):
    """Recursively turn tensors / dataclasses / tuples into JSON-friendly values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.device):
        return str(obj)
    return str(obj)
