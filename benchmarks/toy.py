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
from benchmarks.training import compare_steps, step_rows

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
    res["table"] = step_rows(res, "samples", {
        "without_dense_jacobian": "without the small-dimension Jacobian path",
        "generic_autograd_path": "with the structured fast paths off: autograd"})
    return res
