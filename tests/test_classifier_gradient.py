"""The classifier's training gradient is the exact gradient of its formula.

Issue 16 asked whether the constraint's cost came from the normalisation's hand-written
backward (``_SoftNormalize``). The reference here is independent of that code and of
``conv_ops``: every normalised map applies ``W / max(1, <u, A_W v> / c)`` written with plain
``F.conv2d`` / ``F.linear`` (``u``, ``v`` the layer's vectors, held constant), and autograd in
float64 differentiates it. Every layer kind of the classifier is covered (3x3 convs, 1x1 convs,
dense maps of the vector model), each scaled above ``c`` so that the clamp is active.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from iresflow.models.classifier import IResNetClassifier
from iresflow.nn.lipschitz import LIPSCHITZ_LAYERS, LipschitzConv2d


def _reference_weight(layer) -> torch.Tensor:
    """``W / max(1, sigma / c)`` with ``sigma = <u, A_W v>`` by plain ops (A_W: the layer's map)."""
    w, u, v = layer.weight, layer.u.detach(), layer.v.detach()
    if isinstance(layer, LipschitzConv2d) and not layer.is_matrix:
        sigma = (u * F.conv2d(v, w, None, layer.stride, layer.padding)).sum()
    else:
        sigma = torch.dot(u, w.flatten(1) @ v)
    return w / torch.clamp(sigma / layer.coeff, min=1.0)


def _reference_model(model):
    """A copy whose normalised layers apply :func:`_reference_weight` (same vectors, no upkeep)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, LIPSCHITZ_LAYERS):
            m.weight_for = lambda x, m=m: _reference_weight(m)
    return ref


def _model(in_shape, dtype):
    torch.manual_seed(0)
    stages = [[1, 6], [1, 8]] if len(in_shape) == 3 else [[2, 12]]
    model = IResNetClassifier(in_shape, 10, stages=stages, coeff=0.9, init_pad=3).to(dtype).train()
    with torch.no_grad():  # every map well above c: the normalisation (and its gradient term) is active
        for m in model.modules():
            if isinstance(m, LIPSCHITZ_LAYERS):
                m.weight.mul_(4.0)
    kinds = {("conv1x1" if getattr(m, "is_matrix", False) else "conv") if isinstance(m, LipschitzConv2d)
             else "linear" for m in model.modules() if isinstance(m, LIPSCHITZ_LAYERS)}
    return model, kinds


def _grads(model, x, y):
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (16,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_classifier_gradient_matches_float64_autograd(in_shape, dtype):
    model, kinds = _model(in_shape, dtype)
    assert kinds == ({"conv", "conv1x1"} if len(in_shape) == 3 else {"linear"})
    x = torch.randn(12, *in_shape, dtype=dtype)
    y = torch.arange(12) % 10
    model(x)  # the training forward's upkeep: the vectors for these weights
    clamped = [float(m.spectral_norm().detach()) / m.coeff for m in model.modules() if isinstance(m, LIPSCHITZ_LAYERS)]
    assert min(clamped) > 1.0
    ref = _reference_model(model).double()
    got = _grads(model, x, y)
    want = _grads(ref, x.double(), y)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    # (a gradient that is 0 in exact arithmetic -- the last conv's bias before the head's BatchNorm --
    # is float32 rounding: measured against a tenth of the whole gradient)
    floor = 1e-1 * float(torch.cat([r.flatten() for r in want]).norm())
    for (name, _), g, r in zip(model.named_parameters(), got, want):
        err = float((g.double() - r).norm()) / max(float(r.norm()), floor)
        assert err < tol, f"{name}: relative gradient error {err:.2e}"
