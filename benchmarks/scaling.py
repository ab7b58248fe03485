"""Benchmark -- cost growth: step time and peak memory against batch size, width, depth and
series length, with the fitted exponent of each.

One iresflow training step (forward, backward, Adam; the toy flow's settings, smaller),
varying one size at a time from a base point; the exponent ``a`` of ``cost ~ size^a``
is the least-squares slope of ``log cost`` against ``log size``. The series-length
study uses the truncated series (exactly ``n`` terms) on 16-dimensional inputs, where
every term is a vector-Jacobian product (on 2-D inputs the materialised 2 x 2 Jacobian
makes the terms nearly free), in both constant-memory gradient modes and backprop.

Expected: time ~ batch^1 (less at small batches, where per-op overhead dominates),
~ width^(1..2) (the hidden products), ~ depth^1, ~ n^(<1) (fixed costs besides the
terms); memory flat in n for memory_efficient and neumann, linear for backprop.
"""

from __future__ import annotations

import math

import torch

from benchmarks.common import Context, jsonable, peak_memory, target, timed
from benchmarks.flows import FlowSettings, batch_for, iresflow_side

TITLE = "Cost growth: step time and memory vs batch, width, depth, series length"


def fitted_exponent(sizes, costs) -> float:
    """Least-squares slope of log(cost) against log(size)."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(c) for c in costs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _measure(ctx: Context, s: FlowSettings, repeats: int) -> tuple[float, int]:
    torch.manual_seed(ctx.seed)
    x = batch_for(s, ctx.device, ctx.seed) if s.dim == 2 else torch.randn(s.batch, s.dim, device=ctx.device)
    side = iresflow_side(s, ctx.device, x)
    side.step()  # ActNorm initialisation, Adam state
    t = min(timed(side.step, ctx.device) for _ in range(repeats))  # (the minimum: robust to a busy machine)
    return t, peak_memory(side.step, ctx.device)


def run(ctx: Context) -> dict:
    base = FlowSettings(kind="toy", dim=2, n_blocks=4, hidden=(128, 128, 128), batch=512)
    if ctx.quick:
        studies = {"batch": [16, 32], "width": [8, 16], "depth": [1, 2], "series length": [1, 4]}
        base = base.with_(n_blocks=1, hidden=(8, 8, 8), batch=16)
        repeats = 1
    else:
        studies = {"batch": [128, 256, 512, 1024, 2048], "width": [32, 64, 128, 256, 512], "depth": [2, 4, 8, 16],
                   "series length": [1, 2, 5, 10, 20]}
        repeats = 5
    series_base = base.with_(dim=16, estimator="power_series")
    rows, res = [], {"base": base.as_dict(), "series_base": series_base.as_dict(), "studies": {}}
    for study, sizes in studies.items():
        modes = ("memory_efficient", "neumann", "backprop") if study == "series length" else ("memory_efficient",)
        for mode in modes:
            times, mems = [], []
            for size in sizes:
                if study == "batch":
                    s = base.with_(batch=size)
                elif study == "width":
                    s = base.with_(hidden=(size,) * 3)
                elif study == "depth":
                    s = base.with_(n_blocks=size)
                else:
                    s = series_base.with_(n_terms=size, gradient=mode)
                t, mem = _measure(ctx, s, repeats)
                times.append(t)
                mems.append(mem)
                ctx.log(f"scaling: {study:13s} {mode:16s} {size:5d}: step {t*1e3:7.1f} ms, peak {mem/2**20:6.1f} MiB")
            key = study if study != "series length" else f"series length ({mode})"
            mems = [max(m, 1) for m in mems]
            entry = {"sizes": sizes, "step_s": times, "peak_bytes": mems,
                     "time_exponent": fitted_exponent(sizes, times),
                     "memory_exponent": fitted_exponent(sizes, mems),
                     # between the two largest sizes: the growth once fixed costs no longer dominate
                     "time_exponent_largest": fitted_exponent(sizes[-2:], times[-2:]),
                     "memory_exponent_largest": fitted_exponent(sizes[-2:], mems[-2:])}
            res["studies"][key] = entry
            rows.append({"metric": f"{key}: step time ~ size^a at {sizes} (a over all; largest two: "
                                   f"{entry['time_exponent_largest']:.2f})",
                         "iresflow": " / ".join(f"{t*1e3:.1f}" for t in times) + " ms",
                         "ratio": entry["time_exponent"], "ratio_meaning": "exponent a"})
            rows.append({"metric": f"{key}: peak memory ~ size^a (largest two: {entry['memory_exponent_largest']:.2f})",
                         "iresflow": " / ".join(f"{m/2**20:.1f}" for m in mems) + " MiB",
                         "ratio": entry["memory_exponent"], "ratio_meaning": "exponent a"})
    flat = res["studies"]["series length (memory_efficient)"]["memory_exponent"]
    res["targets"] = [target("memory_efficient peak memory exponent in series length", flat, "<=", 0.05, unit="x",
                             description="fitted exponent of peak memory against n (0: flat)")]
    res["table"] = rows
    return jsonable(res)
