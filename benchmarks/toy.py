"""Benchmark 1 -- toy flow training step, iresflow vs normflows.

16 blocks of an MLP 2-128-128-128-2 (LipSwish, c = 0.9), Russian roulette
(geometric p = 0.5, 2 exact terms), memory-efficient gradients, ActNorm after
each block, batch 512, 5 power iterations per step. Throughput of one full
training step (forward, backward, Adam, power iterations), timed interleaved;
the reported speed-up is the median over pairs of normflows' time / iresflow's.

Target: speed-up >= 2.
"""

from __future__ import annotations

from benchmarks.common import Context, target
from benchmarks.flows import FlowSettings, generic_autograd_path, without_dense_jacobian
from benchmarks.training import compare_steps

TITLE = "Toy flow training step (2D, 16 MLP blocks)"


def settings(ctx: Context) -> FlowSettings:
    s = FlowSettings(kind="toy", dim=2, n_blocks=16, hidden=(128, 128, 128), batch=512)
    if ctx.quick:
        s = s.with_(n_blocks=2, hidden=(16, 16), batch=32)
    return s


def run(ctx: Context) -> dict:
    s = settings(ctx)
    pairs, warmup = (3, 1) if ctx.quick else ((40, 3) if ctx.cuda else (20, 3))
    res = compare_steps(ctx, s, pairs=pairs, warmup=warmup, tag="toy", memory=True,
                        variants={"without_dense_jacobian": without_dense_jacobian,
                                  "generic_autograd_path": generic_autograd_path})
    res["targets"] = [target("toy step speed-up vs normflows", res["speedup_median"], ">=", 2.0,
                             unit="x", description="median over interleaved pairs of t_normflows / t_iresflow")]
    res["table"] = [
        {"metric": "step time (ms)", "iresflow": res["time"]["iresflow"]["median_s"] * 1e3,
         "normflows": res["time"]["normflows"]["median_s"] * 1e3, "ratio": res["speedup_median"],
         "ratio_meaning": "speed-up"},
        {"metric": "speed-up if iresflow n_exact_terms=2 literally (info)",
         "ratio": res.get("speedup_nominal_median"), "ratio_meaning": "speed-up, 1 term fewer"},
        {"metric": "speed-up without the small-dimension Jacobian path (info)",
         "ratio": res["variants"]["without_dense_jacobian"]["speedup_median"], "ratio_meaning": "speed-up"},
        {"metric": "speed-up with the structured fast paths off: autograd (info)",
         "ratio": res["variants"]["generic_autograd_path"]["speedup_median"], "ratio_meaning": "speed-up"},
        {"metric": "throughput (samples/s)", "iresflow": res["throughput_samples_per_s"]["iresflow"],
         "normflows": res["throughput_samples_per_s"]["normflows"]},
        {"metric": "mean series terms / block", "iresflow": res["mean_series_terms"]["iresflow"],
         "normflows": res["mean_series_terms"]["normflows"]},
        {"metric": "peak memory (MiB)", "iresflow": res["peak_memory_bytes"]["iresflow"] / 2**20,
         "normflows": res["peak_memory_bytes"]["normflows"] / 2**20, "ratio": res["peak_memory_ratio"],
         "ratio_meaning": "iresflow / normflows"},
    ]
    return res
