"""Matrix products of the fused path: ``a @ w^T`` (+ bias) through oneDNN where that is faster.

On CPU, torch's float32 ``mm`` goes to MKL's sgemm; oneDNN's matmul (bundled with torch,
reached through ``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU
backend uses for linear layers) ran the fused path's products about twice as fast on
the machines we measured (e.g. ``[512, 128] @ [128, 128]``: 85 vs 175 us on an AMD EPYC
core). It is used for float32 and bfloat16 products on CPU with every side at least
``ONEDNN_MIN_DIM`` and enough work to pay for its set-up, outside autocast; everything else (float64, thin products,
CUDA,
autocast, a torch build without the op) takes the plain torch ops. The numbers are the
same up to the order of the float32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear", "matmul", "ONEDNN_MIN_DIM", "onednn_enabled"]

ONEDNN_MIN_DIM = 16
# (a oneDNN call costs some 20 us of set-up: worth it from about this many multiply-adds)
ONEDNN_MIN_WORK = 1 << 21
_PACKET = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_OP = getattr(_PACKET, "default", None)


def _probe() -> bool:
    """The op exists and computes a product in this build."""
    if _OP is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        a = torch.ones(2, 3)
        return bool(torch.equal(_OP(a, torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0)))
    except (RuntimeError, NotImplementedError):  # an op this build cannot run: use torch's
        return False


#: switch for ablations (``benchmarks/flows.py``) and the differential test
onednn_enabled = _probe()


def _onednn(a: torch.Tensor, w: torch.Tensor) -> bool:
    if not (onednn_enabled and a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16)
            and w.dtype == a.dtype and not torch.is_autocast_enabled("cpu")):
        return False
    rows, inner, out = a.numel() // a.shape[-1], a.shape[-1], w.shape[0]
    return min(rows, inner, out) >= ONEDNN_MIN_DIM and rows * inner * out >= ONEDNN_MIN_WORK


def linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ w^T + bias`` (``a`` of any leading dims), like ``F.linear``."""
    if _onednn(a, w) and (bias is None or bias.dtype == a.dtype):
        return _OP(a, w, bias, "none", [], "")
    return F.linear(a, w, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` and ``b``. A product with only a few columns is formed
    transposed: BLAS runs e.g. ``[512, 128] @ [128, 2]`` several times faster as
    ``([2, 128] @ [128, 512])^T``."""
    if b.shape[1] <= 8 < a.shape[0]:
        return (b.t() @ a.t()).t()
    return linear(a, b.t())
