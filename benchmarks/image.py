"""Benchmark 2 -- image flow training step on 1x28x28, iresflow vs normflows.

Conv residual blocks (i-ResNet bottleneck 3x3 -> 1x1 -> 3x3, LipSwish, c = 0.9)
with the toy benchmark's settings otherwise (Russian roulette geometric, 2
exact terms, memory-efficient gradients, ActNorm after each block; the
Lipschitz upkeep of the *convolution operator*: iresflow's default converges it
after every step, normflows runs 5 power iterations per step, as does the
information row "the papers' upkeep"). Throughput timed
interleaved, and peak memory of one step (allocator high-water mark above the
live set; CUDA: max_memory_allocated, CPU: profiler allocation events).

The size is chosen per device (a 2-core CPU cannot run the GPU size in
minutes); both sides always share it.

Targets: speed-up >= 2.5 and peak memory iresflow / normflows <= 1.
"""

from __future__ import annotations

from benchmarks.common import Context, target
from benchmarks.flows import FlowSettings, generic_autograd_path, papers_upkeep
from benchmarks.training import COMPILED, compare_steps, step_rows

TITLE = "Image flow training step (1x28x28, conv blocks)"


def settings(ctx: Context) -> FlowSettings:
    s = FlowSettings(kind="image", in_shape=(1, 28, 28), kernel_sizes=(3, 1, 3))
    if ctx.quick:
        return s.with_(n_blocks=1, hidden=4, batch=4)
    if ctx.cuda:
        return s.with_(n_blocks=16, hidden=64, batch=256)
    return s.with_(n_blocks=4, hidden=32, batch=32)


def run(ctx: Context) -> dict:
    s = settings(ctx)
    pairs, warmup = (3, 1) if ctx.quick else ((20, 3) if ctx.cuda else (20, 2))
    variants = {"generic_autograd_path": generic_autograd_path, "papers_upkeep": papers_upkeep}
    if not ctx.quick:  # (compiling takes a while: not in the smoke test)
        variants["compiled"] = COMPILED
    res = compare_steps(ctx, s, pairs=pairs, warmup=warmup, tag="image", memory=True, variants=variants)
    res["targets"] = [
        target("image step speed-up vs normflows", res["speedup_median"], ">=", 2.5, unit="x",
               description="median over interleaved pairs of t_normflows / t_iresflow"),
        target("image peak memory iresflow / normflows", res["peak_memory_ratio"], "<=", 1.0, unit="x",
               description="allocator high-water mark of one training step above the live set"),
    ]
    labels = {"generic_autograd_path": "with the structured fast paths off: autograd",
              "papers_upkeep": "with the papers' upkeep (power_iteration: the bound not held at every step)",
              "compiled": "with the compile option (model.compile: true)"}
    res["table"] = step_rows(res, "images", {k: labels[k] for k in variants}) + [
        {"metric": "saved for backward (MiB)",
         "iresflow": res["saved_for_backward_bytes"]["iresflow"] / 2**20,
         "normflows": res["saved_for_backward_bytes"]["normflows"] / 2**20},
    ]
    if "compiled" in res.get("variants", {}):
        res["compile_speedup_vs_eager"] = res["variants"]["compiled"]["speedup_vs_default_median"]
        res["table"].append({"metric": "compile option: step speed-up over the default (info)",
                             "ratio": res["compile_speedup_vs_eager"], "ratio_meaning": "compiled / eager"})
    return res
