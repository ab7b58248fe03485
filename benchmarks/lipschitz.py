"""Benchmark 6 -- cost of the Lipschitz constraint.

The same iresflow flow trained with spectral normalisation (the default
upkeep: every map's top singular pair converged after every step, so the bound
holds at every step; sigma = u^T W v with gradient, weight divided by
max(1, sigma/c)) and without it (every Lipschitz layer replaced by
a plain Linear / Conv2d holding the same normalised weight, so the function,
the series and its cost are the same). Interleaved rounds; both sides of a
round reseed torch so the Russian roulette draws the same number of terms.

share = 1 - t_without / t_with  (median over rounds).

Target: share <= 25% on the toy training step. The image flow (Lanczos on
the convolution *operator*, i.e. conv2d + conv_transpose2d on a 28x28 map) is
reported alongside.
"""

from __future__ import annotations

import copy

import torch

from benchmarks.common import Context, interleaved, jsonable, median, pair_ratios, summarize_times, target
from benchmarks.flows import batch_for, iresflow_side, strip_spectral_norm

TITLE = "Cost of spectral normalisation in a training step"


def _settings(ctx):
    from benchmarks import image, toy

    return {"toy": toy.settings(ctx), "image": image.settings(ctx)}


def run(ctx: Context) -> dict:
    res = {"settings": {}, "cases": {}}
    for case, s in _settings(ctx).items():
        x = batch_for(s, ctx.device, ctx.seed)
        torch.manual_seed(ctx.seed)
        with_sn = iresflow_side(s, ctx.device, x)
        with_sn.step()  # ActNorm data init and power-iteration vectors, before the copy
        plain_model = strip_spectral_norm(copy.deepcopy(with_sn.model))
        without = iresflow_side(s, ctx.device, x, model=plain_model)
        pairs = 3 if ctx.quick else (10 if case == "image" and not ctx.cuda else 20)

        state = {"r": 0}

        def reseeded(step):
            def f():
                torch.manual_seed(ctx.seed + 1000 + state["r"] // 2)
                state["r"] += 1
                return step()
            return f

        times = interleaved({"with_sn": reseeded(with_sn.step), "without_sn": reseeded(without.step)},
                            ctx.device, pairs=pairs, warmup=2)
        shares = [1 - r for r in pair_ratios(times["without_sn"], times["with_sn"])]
        res["settings"][case] = s.as_dict()
        res["cases"][case] = {"time": {k: summarize_times(v) for k, v in times.items()},
                              "share_per_pair": shares, "share_median": median(shares)}
        ctx.log(f"lipschitz: {case}: with SN {median(times['with_sn'])*1e3:.1f} ms, without "
                f"{median(times['without_sn'])*1e3:.1f} ms -> SN share {median(shares)*100:.1f}%")
    res["targets"] = [target("spectral-norm share of toy step", res["cases"]["toy"]["share_median"], "<=", 0.25,
                             unit="fraction")]
    if "image" in res["cases"]:
        res["targets"].append(target("spectral-norm share of image step", res["cases"]["image"]["share_median"],
                                     "<=", 0.25, unit="fraction"))
    res["table"] = [{"metric": f"{case}: step ms with / without SN",
                     "iresflow": f"{c['time']['with_sn']['median_s']*1e3:.1f} / "
                                 f"{c['time']['without_sn']['median_s']*1e3:.1f}",
                     "ratio": c["share_median"], "ratio_meaning": "SN share of step"}
                    for case, c in res["cases"].items()]
    return jsonable(res)
