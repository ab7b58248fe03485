"""Benchmark 7 (CUDA only) -- CIFAR-10-sized density model.

iresflow's registered ``iresnet_flow`` model on 3x32x32 inputs (multi-scale
conv flow, its default architecture with the toy settings' estimator:
Russian roulette geometric, memory-efficient gradients), one training step
at batch 64: images per second and peak memory. Skipped on CPU (minutes per
step on a laptop core; nothing to learn there).
"""

from __future__ import annotations

import inspect

import torch

from benchmarks.common import Context, jsonable, median, peak_memory, timed

TITLE = "CIFAR-10-sized density model (CUDA only, batch 64)"
CUDA_ONLY = True


def build_model(ctx: Context):
    import iresflow.models  # noqa: F401 - registers the models
    from iresflow.registry import build, get

    wanted = {"in_shape": (3, 32, 32), "coeff": 0.9, "activation": "lipswish",
              "estimator": {"name": "russian_roulette", "distribution": "geometric", "p": 0.5,
                            "n_terms": 2, "gradient": "memory_efficient"}}
    try:  # pass only what the factory accepts (its signature is the model owner's)
        params = inspect.signature(get("model", "iresnet_flow")).parameters
        kw = {k: v for k, v in wanted.items() if k in params}
    except Exception:  # noqa: BLE001
        kw = {"in_shape": (3, 32, 32)}
    return build("model", "iresnet_flow", **kw).to(ctx.device).train(), kw


def run(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"status": "skipped", "reason": "CUDA only", "targets": [], "table": []}
    batch = 8 if ctx.quick else 64
    torch.manual_seed(ctx.seed)
    model, kw = build_model(ctx)
    x = ((torch.randint(0, 256, (batch, 3, 32, 32)).float() + torch.rand(batch, 3, 32, 32)) / 256).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = -model.log_prob(x).mean()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    ts = [timed(step, ctx.device) for _ in range(3 if ctx.quick else 10)]
    mem = peak_memory(step, ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"settings": {"batch": batch, "model": "iresnet_flow", **kw}, "params": n_params,
           "step_s": median(ts), "images_per_s": batch / median(ts), "peak_memory_bytes": mem,
           "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(ctx.device), "targets": []}
    ctx.log(f"cifar: {batch / median(ts):.1f} images/s, peak {mem/2**20:.0f} MiB, {n_params} params")
    out["table"] = [{"metric": "images/s (batch 64)", "iresflow": out["images_per_s"]},
                    {"metric": "peak memory of a step (MiB)", "iresflow": mem / 2**20}]
    return jsonable(out)
