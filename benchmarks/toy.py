"""Benchmark 1 -- toy flow training step, iresflow vs normflows.

16 blocks of an MLP 2-128-128-128-2 (LipSwish, c = 0.9), Russian roulette
(geometric p = 0.5, 2 exact terms), memory-efficient gradients, ActNorm after
each block, batch 512. The Lipschitz upkeep: iresflow's default (every map's top
singular pair converged after every step, so the bound holds at every step);
normflows' 5 power iterations per step (so does the information row "the papers'
upkeep"). Throughput of one full training step (forward, backward, Adam, upkeep),
timed interleaved; the reported speed-up is the median over pairs of normflows'
time / iresflow's.

Targets: speed-up >= 2, peak memory <= normflows'.
"""

from __future__ import annotations

from benchmarks.common import Context, target
from benchmarks.flows import (FlowSettings, generic_autograd_path, papers_upkeep, without_dense_jacobian,
                              without_onednn)
from benchmarks.training import COMPILED, compare_steps, step_rows

TITLE = "Toy flow training step (2D, 16 MLP blocks)"


def settings(ctx: Context) -> FlowSettings:
    s = FlowSettings(kind="toy", dim=2, n_blocks=16, hidden=(128, 128, 128), batch=512)
    if ctx.quick:
        s = s.with_(n_blocks=2, hidden=(16, 16), batch=32)
    return s


def run(ctx: Context) -> dict:
    s = settings(ctx)
    pairs, warmup = (3, 1) if ctx.quick else ((40, 3) if ctx.cuda else (20, 3))
    variants = {"without_dense_jacobian": without_dense_jacobian, "without_onednn": without_onednn,
                "generic_autograd_path": generic_autograd_path, "papers_upkeep": papers_upkeep}
    if not ctx.quick:  # (compiling takes a minute or so: not in the smoke test)
        variants["compiled"] = COMPILED
    res = compare_steps(ctx, s, pairs=pairs, warmup=warmup, tag="toy", memory=True, variants=variants)
    res["targets"] = [
        target("toy step speed-up vs normflows", res["speedup_median"], ">=", 2.0,
               unit="x", description="median over interleaved pairs of t_normflows / t_iresflow"),
        target("toy peak memory iresflow / normflows", res["peak_memory_ratio"], "<=", 1.0, unit="x",
               description="allocator high-water mark of one training step above the live set"),
    ]
    labels = {"without_dense_jacobian": "without the small-dimension Jacobian path",
              "without_onednn": "with the fused path's products on torch's mm (MKL) instead of oneDNN",
              "generic_autograd_path": "with the structured fast paths off: autograd",
              "papers_upkeep": "with the papers' upkeep (power_iteration: the bound not held at every step)",
              "compiled": "with the compile option (model.compile: true)"}
    res["table"] = step_rows(res, "samples", {k: labels[k] for k in variants})
    if "compiled" in res.get("variants", {}):
        res["compile_speedup_vs_eager"] = res["variants"]["compiled"]["speedup_vs_default_median"]
        res["table"].append({"metric": "compile option: step speed-up over the default (info)",
                             "ratio": res["compile_speedup_vs_eager"], "ratio_meaning": "compiled / eager"})
    return res
