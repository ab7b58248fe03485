"""Benchmark 3 -- peak memory of a training step against the series length n.

The truncated power series with exactly n terms (deterministic, so every n is
measured at its own cost) on the image flow, in each gradient mode:

- ``backprop``: the series is built with create_graph -> memory grows ~ n;
- ``neumann``: value without graph, gradient from the Neumann surrogate -> flat;
- ``memory_efficient``: neumann + gradient computed in the forward -> flat.

normflows is measured alongside for the two modes it has (``reduce_memory``
False = backprop, True = memory efficient), as a reference line.

Target: memory_efficient peak at n = 20 <= 1.2 x its peak at n = 2.
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import Context, jsonable, median, peak_memory, target, timed
from benchmarks.flows import FlowSettings, batch_for, iresflow_side, normflows_side

TITLE = "Peak memory vs series length (image flow, truncated series)"
MODES = ("backprop", "neumann", "memory_efficient")


def settings(ctx: Context) -> tuple[FlowSettings, tuple[int, ...]]:
    s = FlowSettings(kind="image", in_shape=(1, 28, 28), estimator="power_series")
    if ctx.quick:
        return s.with_(n_blocks=1, hidden=4, batch=4), (1, 2, 5)
    if ctx.cuda:
        return s.with_(n_blocks=8, hidden=64, batch=64), (1, 2, 5, 10, 20)
    return s.with_(n_blocks=2, hidden=32, batch=16), (1, 2, 5, 10, 20)


def _measure(ctx, make_side) -> tuple[int, float]:
    side = make_side()
    side.step()  # warm-up: ActNorm init, Adam state, power-iteration vectors
    mem = peak_memory(side.step, ctx.device)
    t = median([timed(side.step, ctx.device) for _ in range(1 if not ctx.cuda else 3)])
    del side
    return mem, t


def run(ctx: Context) -> dict:
    s, ns = settings(ctx)
    x = batch_for(s, ctx.device, ctx.seed)
    rows = {}
    for lib, modes in (("iresflow", MODES), ("normflows", ("backprop", "memory_efficient"))):
        for mode in modes:
            key = f"{lib}/{mode}"
            rows[key] = {"n": list(ns), "peak_bytes": [], "step_s": []}
            for n in ns:
                st = s.with_(n_terms=n, gradient=mode)
                torch.manual_seed(ctx.seed)
                if lib == "iresflow":
                    mem, t = _measure(ctx, lambda: iresflow_side(st, ctx.device, x))
                else:
                    mem, t = _measure(ctx, lambda: normflows_side(st, ctx.device, x, n_power_series=n))
                rows[key]["peak_bytes"].append(mem)
                rows[key]["step_s"].append(t)
                ctx.log(f"memory: {key:28s} n={n:2d}  peak {mem/2**20:8.2f} MiB  step {t*1e3:7.1f} ms")

    me = rows["iresflow/memory_efficient"]
    lo, hi = (2, 20) if 20 in ns else (ns[1], ns[-1])
    ratio = me["peak_bytes"][ns.index(hi)] / me["peak_bytes"][ns.index(lo)]
    res = {"settings": s.as_dict() | {"estimator": "power_series", "n_values": list(ns)},
           "series": rows, "memory_efficient_ratio": ratio, "ratio_between": [lo, hi]}
    res["targets"] = [target(f"memory_efficient peak n={hi} / n={lo}", ratio, "<=", 1.2, unit="x")]
    res["table"] = []
    for key, r in rows.items():
        row = {"metric": f"{key} peak MiB at n=" + ",".join(map(str, ns)),
               "iresflow" if key.startswith("iresflow") else "normflows":
                   " / ".join(f"{b/2**20:.1f}" for b in r["peak_bytes"])}
        row["ratio"] = r["peak_bytes"][ns.index(hi)] / r["peak_bytes"][ns.index(lo)]
        row["ratio_meaning"] = f"n={hi} / n={lo}"
        res["table"].append(row)
    res["plots"] = [_plot(ctx, rows, ns)]
    return jsonable(res)


def _plot(ctx, rows, ns):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, r in rows.items():
        ax.plot(ns, [b / 2**20 for b in r["peak_bytes"]], marker="o",
                linestyle="-" if key.startswith("iresflow") else "--", label=key)
    ax.set_xlabel("series terms n")
    ax.set_ylabel("peak memory of a step (MiB)")
    ax.set_title("Memory vs series length")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(ctx.out_dir, "memory_vs_terms.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
