"""A convolution, its adjoint and its weight gradient, as matrix products where that is faster.

oneDNN runs convolutions from or to a few channels slowly (a 3x3 conv from or to
ONE channel at a few GFLOPS, its transpose slower still). For a stride-1 'same'
convolution:

* ``POINTWISE`` (1x1): ``y[b] = W x[b]``, a matmul over the channels;
* ``FEW_IN`` (few input channels): ``y[b] = W unfold(x[b])``, a matmul of the unfolded input;
* ``FEW_OUT`` (few output channels): mix the channels per kernel tap, then shift and
  add the taps (``fold``, the adjoint of ``unfold``, with the taps reversed).

Each computes the same map (and adjoint and weight gradient) as ``conv2d``;
everything else uses torch's convolutions (``GENERIC``). Used by the Lipschitz
layers' power iteration and by the log-det estimators' Jacobian products.

Under ``torch.autocast`` the products run in the autocast dtype, as ``conv2d`` would.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvStrategy", "conv_strategy", "conv_output_size", "output_padding", "conv_forward",
           "conv_input_grad", "conv_weight_grad"]

# channels x k x k up to this unfold cheaply
THIN_CONV_MAX = 36


class ConvStrategy(enum.Enum):
    GENERIC = "generic"
    POINTWISE = "pointwise"
    FEW_IN = "few_in"
    FEW_OUT = "few_out"


def conv_strategy(m: nn.Conv2d) -> ConvStrategy:
    """How :func:`conv_forward` and friends compute ``m``'s map."""
    if m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1 or isinstance(m.padding, str):
        return ConvStrategy.GENERIC
    (kh, kw), (ph, pw) = m.kernel_size, m.padding
    if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
        return ConvStrategy.POINTWISE
    if kh % 2 == 1 and kw % 2 == 1 and (ph, pw) == (kh // 2, kw // 2):
        if m.in_channels * kh * kw <= THIN_CONV_MAX:
            return ConvStrategy.FEW_IN
        if m.out_channels * kh * kw <= THIN_CONV_MAX:
            return ConvStrategy.FEW_OUT
    return ConvStrategy.GENERIC


def conv_output_size(m: nn.Conv2d, size) -> tuple[int, int]:
    """``(H_out, W_out)`` of ``m`` on inputs of spatial ``size``."""
    return tuple((size[i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
                 for i in range(2))


def output_padding(m: nn.Conv2d, size, out_size) -> tuple[int, int]:
    """The ``output_padding`` that makes ``conv_transpose2d`` restore the input ``size``
    (a strided convolution drops rows and columns)."""
    return tuple(int(size[i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1
                     - (out_size[i] - 1) * m.stride[i]) for i in range(2))


def _left(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x[b]`` for every b (``w`` 2-D, ``x`` 3-D) as one batched product (torch.matmul
    would transpose ``x`` into one big matrix and back: two copies of it)."""
    return torch.bmm(w.expand(x.shape[0], *w.shape), x)


def _flip_taps(z: torch.Tensor, channels: int, taps: int) -> torch.Tensor:
    """Reverse the kernel-tap order within each channel block of ``[B, channels * taps, L]``."""
    return z.view(z.shape[0], channels, taps, -1).flip(2).view(z.shape[0], channels * taps, -1)


def conv_forward(strategy: ConvStrategy, m: nn.Conv2d, x: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, w, b)`` with ``m``'s geometry."""
    if strategy is ConvStrategy.GENERIC:
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation)
    bsz, c, h, wd = x.shape
    o = w.shape[0]
    if strategy is ConvStrategy.POINTWISE:
        y = _left(w.view(o, c), x.reshape(bsz, c, h * wd))
    elif strategy is ConvStrategy.FEW_IN:
        y = _left(w.reshape(o, -1), F.unfold(x, m.kernel_size, padding=m.padding))
    else:  # FEW_OUT: mix channels per tap, then shift-and-add the taps (a fold)
        taps = m.kernel_size[0] * m.kernel_size[1]
        z = _left(w.permute(0, 2, 3, 1).reshape(o * taps, c), x.reshape(bsz, c, h * wd))
        y = F.fold(_flip_taps(z, o, taps), (h, wd), m.kernel_size, padding=m.padding)
    y = y.view(bsz, o, h, wd)
    if b is not None:
        y = y + b.view(1, o, 1, 1).to(y.dtype)
    return y


def conv_input_grad(strategy: ConvStrategy, m: nn.Conv2d, g: torch.Tensor, w: torch.Tensor,
                    out_padding=(0, 0)) -> torch.Tensor:
    """``conv_transpose2d(g, w)``: the adjoint map (the gradient w.r.t. the input)."""
    if strategy is ConvStrategy.GENERIC:
        return F.conv_transpose2d(g, w, None, m.stride, m.padding, out_padding, 1, m.dilation)
    bsz, o, h, wd = g.shape
    c = w.shape[1]
    if strategy is ConvStrategy.POINTWISE:
        return _left(w.view(o, c).t(), g.reshape(bsz, o, h * wd)).view(bsz, c, h, wd)
    if strategy is ConvStrategy.FEW_IN:
        z = _left(w.reshape(o, -1).t(), g.reshape(bsz, o, h * wd))
        return F.fold(z, (h, wd), m.kernel_size, padding=m.padding)
    taps = m.kernel_size[0] * m.kernel_size[1]
    cols = _flip_taps(F.unfold(g, m.kernel_size, padding=m.padding), o, taps)
    return _left(w.permute(1, 0, 2, 3).reshape(c, o * taps), cols).view(bsz, c, h, wd)


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype ``conv2d`` would compute in: autocast's when it is on, else the promoted one."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def conv_weight_grad(strategy: ConvStrategy, m: nn.Conv2d, g: torch.Tensor, x: torch.Tensor,
                     w: torch.Tensor) -> torch.Tensor:
    """``sum_b`` of the gradient of ``<g, conv2d(x, w)>`` w.r.t. ``w``.

    ``g`` and ``x`` may come in different dtypes (under autocast a bfloat16 cotangent
    meets a float32 tangent); both are brought to the dtype the convolution ran in.
    """
    dtype = _common_dtype(g, x)
    g, x = g.to(dtype), x.to(dtype)
    if strategy in (ConvStrategy.GENERIC, ConvStrategy.FEW_IN):  # (oneDNN's weight gradient is fast here)
        return torch.ops.aten.convolution_backward(g, x, w.to(dtype), None, m.stride, m.padding, m.dilation,
                                                   False, [0, 0], 1, [False, True, False])[1]
    bsz, o, h, wd = g.shape
    c = x.shape[1]
    if strategy is ConvStrategy.POINTWISE:
        return torch.bmm(g.reshape(bsz, o, h * wd), x.reshape(bsz, c, h * wd).transpose(1, 2)).sum(0).view_as(w)
    taps = m.kernel_size[0] * m.kernel_size[1]
    cols = _flip_taps(F.unfold(g, m.kernel_size, padding=m.padding), o, taps)
    gw = torch.bmm(x.reshape(bsz, c, h * wd), cols.transpose(1, 2)).sum(0)  # [C, O * taps]
    return gw.view(c, o, *m.kernel_size).permute(1, 0, 2, 3).contiguous()
