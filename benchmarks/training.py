"""Side-by-side training-step comparison used by the toy and image benchmarks."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from benchmarks.common import (Context, interleaved, jsonable, median, pair_ratios, peak_memory,
                               saved_tensor_bytes, summarize_times)
from benchmarks.flows import (CommonDraws, FlowSettings, Side, batch_for, count_params,
                              iresflow_estimator_node, iresflow_side, normflows_side)


def profile_side(ctx: Context, side: Side, steps: int, tag: str, row_limit: int = 25) -> dict:
    """torch.profiler over a few steps: top ops by self time, written to a text file."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    side.step()
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            with record_function(f"{side.name}_step"):
                side.step()
    key = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=row_limit)
    os.makedirs(ctx.out_dir, exist_ok=True)
    path = os.path.join(ctx.out_dir, f"profile_{tag}_{side.name}.txt")
    with open(path, "w") as f:
        f.write(table)
    top = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:12]:
        top.append({"op": e.key, "count": e.count,
                    "self_ms": (getattr(e, key) / 1000.0) / steps})
    return {"file": path, "top_per_step": top}


def compare_steps(ctx: Context, s: FlowSettings, *, pairs: int, warmup: int, tag: str,
                  memory: bool = True, variants: dict | None = None) -> dict:
    """Interleaved iresflow / normflows training steps at identical settings.

    ``variants``: ``{name: context-manager factory}``: more iresflow sides (same
    settings) whose every step runs inside that context -- ablations of a fast
    path, timed in the same interleaved rounds and reported as information. The
    factory :data:`COMPILED` instead builds the side with the compile option
    (``ResidualFlow(compile=True)``); its compilation happens in the warm-up steps.
    """
    torch.manual_seed(ctx.seed)
    x = batch_for(s, ctx.device, ctx.seed)
    # Both sides draw the same roulette N in each step (common random numbers): equal work per pair.
    common = CommonDraws(s.geom_p, s.n_blocks, ctx.seed) if s.estimator == "russian_roulette" else None
    ires = iresflow_side(s, ctx.device, x)
    torch.manual_seed(ctx.seed)
    np.random.seed(ctx.seed)
    ref = normflows_side(s, ctx.device, x)
    if common is not None:
        ires, ref = common.iresflow(ires), common.normflows(ref)
    ctx.log(f"{tag}: params iresflow={count_params(ires.model)} normflows={count_params(ref.model)}")
    fns = {"iresflow": ires.logged_step, "normflows": ref.logged_step}
    nominal = None
    if s.estimator == "russian_roulette" and s.ires_n_exact_terms is None:
        # Also the literal reading "iresflow n_exact_terms = 2" (one term fewer on
        # average than normflows' "2"): reported, not used for the target.
        torch.manual_seed(ctx.seed)
        nominal = common.iresflow(iresflow_side(s.with_(ires_n_exact_terms=s.n_exact_terms), ctx.device, x))
        fns["iresflow_nominal"] = nominal.logged_step
    extra = {}
    for name, context in (variants or {}).items():
        torch.manual_seed(ctx.seed)
        side = iresflow_side(s, ctx.device, x, compiled=context is COMPILED)
        if common is not None:
            side = common.iresflow(side)
        extra[name] = side
        fns[name] = side.logged_step if context is COMPILED else _within(context, side.logged_step)
        if context is COMPILED:
            t0 = time.perf_counter()
            for _ in range(3):  # compiles every activation piece (first shapes, then dynamic ones)
                side.step()
            ctx.log(f"{tag}: variant {name}: compiled in {time.perf_counter() - t0:.1f} s")

    times = interleaved(fns, ctx.device, pairs=pairs, warmup=warmup)
    speedups = pair_ratios(times["normflows"], times["iresflow"])
    out = {
        "settings": s.as_dict() | {"iresflow_n_exact_terms": iresflow_estimator_node(s).get("n_terms")},
        "params": {"iresflow": count_params(ires.model), "normflows": count_params(ref.model)},
        "time": {k: summarize_times(v) for k, v in times.items()},
        "throughput_samples_per_s": {k: s.batch / median(v) for k, v in times.items()},
        "speedup_per_pair": speedups,
        "speedup_median": median(speedups),
        # the estimators' cost must match for the comparison to be fair
        "mean_series_terms": {"iresflow": _mean(ires.term_log), "normflows": _mean(ref.term_log)},
    }
    if nominal is not None:
        sp = pair_ratios(times["normflows"], times["iresflow_nominal"])
        out["speedup_nominal_per_pair"] = sp
        out["speedup_nominal_median"] = median(sp)
        out["mean_series_terms"]["iresflow_nominal"] = _mean(nominal.term_log)
    if extra:
        out["variants"] = {}
        for name, side in extra.items():
            sp = pair_ratios(times["normflows"], times[name])
            own = pair_ratios(times["iresflow"], times[name])  # the variant against the default, per pair
            out["variants"][name] = {"speedup_per_pair": sp, "speedup_median": median(sp),
                                     "speedup_vs_default_median": median(own),
                                     "mean_series_terms": _mean(side.term_log)}
            ctx.log(f"{tag}: variant {name}: speed-up x{median(sp):.2f}")
    ctx.log(f"{tag}: iresflow {out['time']['iresflow']['median_s']*1e3:.1f} ms, "
            f"normflows {out['time']['normflows']['median_s']*1e3:.1f} ms, "
            f"speed-up x{out['speedup_median']:.2f} (nominal x{out.get('speedup_nominal_median', float('nan')):.2f}); "
            f"terms {out['mean_series_terms']}")
    if memory:
        mem = {}
        saved = {}
        for side in (ires, ref):
            mem[side.name] = median([peak_memory(side.step, ctx.device) for _ in range(2)])
            saved[side.name] = saved_tensor_bytes(side.step)
        out["peak_memory_bytes"] = mem
        out["peak_memory_ratio"] = mem["iresflow"] / mem["normflows"] if mem["normflows"] else None
        out["saved_for_backward_bytes"] = saved
        ctx.log(f"{tag}: peak memory iresflow {mem['iresflow']/2**20:.1f} MiB, "
                f"normflows {mem['normflows']/2**20:.1f} MiB")
    if ctx.profile:
        out["profile"] = {side.name: profile_side(ctx, side, 3, tag) for side in (ires, ref)}
    return jsonable(out)


# The variant marker for the compile option (see compare_steps).
COMPILED = object()


def _within(context, step):
    def run():
        with context():
            return step()
    return run


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def step_rows(res: dict, unit: str, variants: dict[str, str]) -> list[dict]:
    """The table rows every training-step benchmark reports (``unit``: samples or images;
    ``variants``: variant name -> row label for the information rows)."""
    rows = [
        {"metric": "step time (ms)", "iresflow": res["time"]["iresflow"]["median_s"] * 1e3,
         "normflows": res["time"]["normflows"]["median_s"] * 1e3, "ratio": res["speedup_median"],
         "ratio_meaning": "speed-up"},
        {"metric": "speed-up if iresflow n_exact_terms=2 literally (info)",
         "ratio": res.get("speedup_nominal_median"), "ratio_meaning": "speed-up, 1 term fewer"},
    ]
    rows += [{"metric": f"speed-up {label} (info)", "ratio": res["variants"][name]["speedup_median"],
              "ratio_meaning": "speed-up"} for name, label in variants.items()]
    rows += [
        {"metric": f"throughput ({unit}/s)", "iresflow": res["throughput_samples_per_s"]["iresflow"],
         "normflows": res["throughput_samples_per_s"]["normflows"]},
        {"metric": "mean series terms / block", "iresflow": res["mean_series_terms"]["iresflow"],
         "normflows": res["mean_series_terms"]["normflows"]},
        {"metric": "peak memory (MiB)", "iresflow": res["peak_memory_bytes"]["iresflow"] / 2**20,
         "normflows": res["peak_memory_bytes"]["normflows"] / 2**20, "ratio": res["peak_memory_ratio"],
         "ratio_meaning": "iresflow / normflows"},
    ]
    return rows
