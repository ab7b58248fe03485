"""The memory-efficient gradient for any ``g``, by autograd: the Neumann gradient formed in the forward.

The forward evaluates ``g`` once, the log-det value without a graph, and the
gradients of the Neumann surrogate w.r.t. ``x`` and ``g``'s parameters; then it
frees that second-order graph. Only ``g``'s first-order graph (for the gradient
through ``g(x)``) and the finished gradients survive until backward, which scales
them by the incoming gradient of the log-det.

Samples are independent, so the x-gradient is exact per sample for any upstream
gradient; the parameter gradient was formed for equal weights on all samples (the
usual mean loss). If the upstream log-det gradient is not the same for all samples,
backward rebuilds the surrogate once from the saved Neumann vectors with the right
per-sample weights (by autograd through ``g``'s first-order graph).

A residual function that is a chain of formula-defined layers takes the fused path
instead (:mod:`.fused`): the same mathematics by hand, without autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from iresflow.nn.logdet.products import AutogradProducts
from iresflow.nn.logdet.series import series, surrogate
from iresflow.nn.logdet.trace import Probes, TraceEstimator, probes_for

__all__ = ["memory_efficient_logdet"]


def memory_efficient_logdet(g: nn.Module, x: torch.Tensor, trace: TraceEstimator, given: torch.Tensor | None,
                            n: int, term_weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g(x), log-det)`` with the memory-efficient Neumann gradient, for any ``g``."""
    params = [p for p in g.parameters() if p.requires_grad]
    return _BackwardInForward.apply(g, trace, given, n, term_weights, x, *params)


class _BackwardInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, trace, given, n, term_weights, x, *params):
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            copies = given.shape[0] if given is not None else max(trace.n_vectors(x), trace.n_sketch(x))
            jac = AutogradProducts(g, xx, copies)
            probes = probes_for(trace, given, xx, jac)
            value, u = series(jac, probes, n, term_weights, create_graph=False, neumann=True)
            s = surrogate(jac, u, probes, create_graph=True)
            grads = torch.autograd.grad(s.sum(), [xx, *params], retain_graph=True, allow_unused=True)
            del s
        ctx.jac, ctx.xx, ctx.params = jac, xx, params
        ctx.unused = [t is None for t in grads]
        ctx.save_for_backward(u, probes.vectors, *[t for t in grads if t is not None])
        return jac.out.detach(), value.detach()

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):
        u, vectors, *saved = ctx.saved_tensors
        kept = iter(saved)
        grads = [None if unused else next(kept) for unused in ctx.unused]
        jac, xx, params = ctx.jac, ctx.xx, ctx.params
        inputs = [xx, *params]
        uniform = bool((grad_logdet == grad_logdet[0]).all())
        with torch.enable_grad():
            dg = torch.autograd.grad(jac.out, inputs, grad_gx, retain_graph=not uniform, allow_unused=True)
            if not uniform:  # per-sample weights on the parameter gradient: rebuild the surrogate
                probes = Probes(vectors, torch.ones(vectors.shape[0], device=vectors.device))
                s = surrogate(jac, u, probes, create_graph=True)
                grads = list(torch.autograd.grad((s * grad_logdet).sum(), inputs, allow_unused=True))
        ctx.jac = ctx.xx = ctx.params = None

        out = []
        for i, (through_g, through_logdet) in enumerate(zip(dg, grads)):
            if through_logdet is not None and uniform:
                if i == 0:  # x: per-sample scaling is exact
                    through_logdet = through_logdet * grad_logdet.view(-1, *([1] * (through_logdet.dim() - 1)))
                else:
                    through_logdet = through_logdet * grad_logdet[0]
            if through_g is None:
                out.append(through_logdet)
            else:
                out.append(through_g if through_logdet is None else through_g + through_logdet)
        dx, *dparams = out
        return (None, None, None, None, None, dx, *dparams)
