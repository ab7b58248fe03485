"""Spectrally normalised Linear and Conv2d: ``W <- W / max(1, sigma(W) / c)``.

``sigma`` is the largest singular value of the *operator* the layer applies:
for a dense layer (and a 1x1 convolution with stride 1) that is the weight
matrix; for a k x k convolution it is the convolution map on inputs of the
real size, with the layer's stride and padding. The norm of the reshaped
kernel matrix is not that operator's norm (it can be several times smaller),
so convolutions iterate with ``conv2d`` and its adjoint ``conv_transpose2d``.

``sigma`` is estimated by power iteration on persistent vectors ``u`` (output
side) and ``v`` (input side), kept as buffers so that a few iterations per
step suffice and checkpoints carry them. The forward uses
``sigma = <u, W v>`` *with* gradient through ``W`` (the vectors are constants),
so the optimiser sees the normalisation, and the soft scaling leaves layers
already below ``c`` untouched.

Iterations run (a) ``n_iterations`` times at every training forward and (b)
on demand through :func:`update_lipschitz`, which the Lightning tasks call
after each optimiser step and before evaluation: the user never has to.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from iresflow.nn.conv_ops import conv_forward, conv_input_grad, conv_strategy, conv_weight_grad

__all__ = ["LipschitzLinear", "LipschitzConv2d", "LIPSCHITZ_LAYERS", "update_lipschitz", "paused_power_iteration"]

_EPS = 1e-12

# Set inside `paused_power_iteration()`.
_PAUSED = contextvars.ContextVar("iresflow_power_iteration_paused", default=False)


@contextlib.contextmanager
def paused_power_iteration():
    """Inside this context, training forwards run no power iteration.

    A plain ``g(x)`` under ``torch.no_grad`` runs none; code that re-enables grad to
    differentiate ``g`` on behalf of a caller that had it off (a log-det estimator
    called under ``no_grad``) wraps that work in this context, so that it behaves
    the same.
    """
    token = _PAUSED.set(True)
    try:
        yield
    finally:
        _PAUSED.reset(token)


# Matrices with a side at most this long run fixed-count power iterations through
# their Gram matrix (see _SpectralNorm._iterate_gram).
_GRAM_MAX_DIM = 16


def _functorch_active() -> bool:
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm().clamp_min(_EPS)


def _normalized_power(g: torch.Tensor, k: int) -> torch.Tensor | None:
    """``g^k`` up to a positive factor (None for ``k = 0``) for a symmetric PSD ``g``, by
    repeated squaring. ``g`` is first scaled to spectral radius <= 1; for large ``k`` the
    factors are renormalised at every step, so no entry over- or underflows."""
    result = None
    renorm = k > 32
    base = g / torch.linalg.matrix_norm(g).clamp_min(_EPS)
    while k:
        if k & 1:
            result = base if result is None else result @ base
            if renorm:
                result = result / torch.linalg.matrix_norm(result).clamp_min(_EPS)
        k >>= 1
        if k:
            base = base @ base
            if renorm:
                base = base / torch.linalg.matrix_norm(base).clamp_min(_EPS)
    return result


class _SpectralNorm:
    """Power iteration and soft scaling shared by the two layers.

    Subclasses provide ``_op(v, W)`` (the operator ``W v``), ``_op_t(u, W)``
    (``W^T u``) and ``_sigma(weight)`` (``<u, W v>`` for a given weight).
    """

    coeff: float
    n_iterations: int
    tol: float | None
    max_iterations: int
    weight: nn.Parameter
    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor

    def _init_spectral(self, coeff: float, n_iterations: int, tol: float | None, max_iterations: int):
        if not coeff > 0:
            raise ValueError(f"coeff must be positive, got {coeff}")
        if n_iterations < 0 or max_iterations < 1:
            raise ValueError("n_iterations must be >= 0 and max_iterations >= 1")
        self.coeff = float(coeff)
        self.n_iterations = int(n_iterations)
        self.tol = tol
        self.max_iterations = int(max_iterations)

    @torch.no_grad()
    def power_iteration(self, n_iterations: int | None = None, tol: float | None = None) -> int:
        """Run power iterations on ``u``/``v``; returns how many ran.

        ``n_iterations`` bounds the count (default ``max_iterations`` when a
        ``tol`` is given, else the layer's ``n_iterations``); with ``tol`` the
        loop stops once the estimate of sigma changes by less than ``tol``
        relative. The new estimate is stored in the ``sigma`` buffer.
        """
        tol = self.tol if tol is None else tol
        if n_iterations is None:
            n_iterations = self.max_iterations if tol is not None else self.n_iterations
        w = self.weight.detach()
        if torch.is_autocast_enabled(w.device.type):
            with torch.autocast(w.device.type, enabled=False):
                return self._iterate(w, n_iterations, tol)
        return self._iterate(w, n_iterations, tol)

    def _iterate(self, w: torch.Tensor, n_iterations: int, tol: float | None) -> int:
        if n_iterations <= 0:
            return 0
        u, v = self.u, self.v
        if self._is_matrix_op():
            # A dense map (or 1x1 conv): plain matrix-vector products, fewest ops per step.
            m = w.reshape(w.shape[0], -1)
            mt = m.t()
            if tol is None and min(m.shape) <= _GRAM_MAX_DIM:
                return self._iterate_gram(m, n_iterations)

            def op(x):
                return torch.mv(m, x)

            def op_t(x):
                return torch.mv(mt, x)
        else:
            def op(x):
                return self._op(x, w)

            def op_t(x):
                return self._op_t(x, w)
        norm = torch.linalg.vector_norm
        prev = self.sigma.item() if tol is not None else 0.0
        # Between iterations only the directions matter: with a fixed count, u is renormalised
        # every third iteration (it grows by about sigma^2 per iteration: for sigma within
        # [1e-3, 1e3] three iterations stay far from float32's range).
        unnormalised = 0
        done = 0
        for done in range(1, n_iterations + 1):
            v = op_t(u)
            if tol is None and done < n_iterations:
                u = op(v)
                unnormalised += 1
                if unnormalised == 3:
                    u = u / norm(u).clamp_min(_EPS)
                    unnormalised = 0
                continue
            v = v / norm(v).clamp_min(_EPS)
            u = op(v)
            sigma = norm(u)
            u = u / sigma.clamp_min(_EPS)
            # Only a tolerance needs the value on the host (a GPU sync per iteration).
            if tol is not None:
                new = sigma.item()
                if abs(new - prev) <= tol * max(new, _EPS):
                    break
                prev = new
        # In-place copies keep the buffers shared with DDP's broadcast and state_dict.
        self.u.copy_(u)
        self.v.copy_(v)
        self.sigma.copy_(sigma)
        return done

    def _iterate_gram(self, m: torch.Tensor, n_iterations: int) -> int:
        """``n`` power iterations at once for a matrix with a small side: the iterate is
        ``v_n ~ (W^T W)^(n-1) W^T u_0`` (and ``u_n ~ W v_n``), and the small Gram
        matrix's power costs a few tiny products instead of ``2 n`` matrix-vector ones."""
        norm = torch.linalg.vector_norm
        if m.shape[1] <= m.shape[0]:
            power = _normalized_power(m.t() @ m, n_iterations - 1)
            v = torch.mv(m.t(), self.u)
            if power is not None:
                v = torch.mv(power, v)
        else:
            power = _normalized_power(m @ m.t(), n_iterations - 1)
            y = self.u if power is None else torch.mv(power, self.u)
            v = torch.mv(m.t(), y)
        v = v / norm(v).clamp_min(_EPS)
        u = torch.mv(m, v)
        sigma = norm(u)
        u = u / sigma.clamp_min(_EPS)
        self.u.copy_(u)
        self.v.copy_(v)
        self.sigma.copy_(sigma)
        return n_iterations

    def _is_matrix_op(self) -> bool:
        return True

    def spectral_norm(self) -> torch.Tensor:
        """``<u, W v>``: the current estimate of sigma(W), differentiable in W.

        Always in the weight's own precision: under bf16 autocast a 3-digit
        sigma would let the normalised layer overshoot ``coeff``.
        """
        with torch.autocast(self.weight.device.type, enabled=False):
            return self._sigma(self.weight)

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, sigma / coeff)``, the weight the forward uses (differentiable in
        ``W``, sigma's dependence on ``W`` included; in the weight's own precision)."""
        if torch.is_autocast_enabled(self.weight.device.type):
            with torch.autocast(self.weight.device.type, enabled=False):
                return self._normalized_weight()
        return self._normalized_weight()

    def _normalized_weight(self) -> torch.Tensor:
        if _functorch_active():  # (torch.func transforms: the plain ops, which they can trace)
            return self.weight / torch.clamp(self._sigma(self.weight) / self.coeff, min=1.0)
        return _SoftNormalize.apply(self.weight, self)

    def _dsigma(self, w: torch.Tensor) -> torch.Tensor:
        """``d<u, W v>/dW`` (the vectors held constant)."""
        return torch.outer(self.u, self.v).view_as(w)

    def lipschitz_constant(self) -> float:
        """Operator norm of the normalised weight, ``min(sigma, coeff)`` by the current estimate."""
        with torch.no_grad():
            return min(float(self.spectral_norm()), self.coeff)

    def _maybe_iterate(self) -> None:
        if self.training and self.n_iterations > 0 and torch.is_grad_enabled() and not _PAUSED.get():
            self._iterate_in_forward()

    def _iterate_in_forward(self) -> None:
        """The training forward's power iterations: the vectors the normalisation divides by."""
        self.power_iteration(self.n_iterations, tol=self.tol)

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight that ``forward(x)`` applies: runs the training-time power
        iterations, then returns :meth:`normalized_weight`. Code that applies the
        layer's linear map itself (the log-det estimators' Jacobian products)
        calls this once per forward instead of ``forward``."""
        self._maybe_iterate()
        return self.normalized_weight()


class _SoftNormalize(torch.autograd.Function):
    """``W / f`` with ``f = max(1, sigma / c)``, ``sigma = <u, W v>`` (``u``, ``v`` constant).

    The same function autograd would differentiate from those three ops, with its
    gradient in a few ops: ``g / f - [sigma >= c] <g, W> / (f^2 c) dsigma/dW``.
    """

    @staticmethod
    def forward(ctx, weight, layer):
        ctx.layer = layer
        sigma = layer._sigma(weight)
        if weight.device.type == "cpu":  # host scalars: reading sigma costs no device sync
            ratio = float(sigma) / layer.coeff
            factor = max(ratio, 1.0)
            # d(W / f)/dW = I / f - W (df/dW)^T / f^2, with df/dW = [sigma >= c] dsigma/dW / c.
            ctx.scalars = (factor, (1.0 if ratio >= 1.0 else 0.0) / (factor * factor * layer.coeff))
            ctx.save_for_backward(weight)
            return weight / factor
        ratio = sigma / layer.coeff
        factor = torch.clamp(ratio, min=1.0)
        k = (ratio >= 1.0) / (factor * factor * layer.coeff)
        ctx.scalars = None
        ctx.save_for_backward(weight, factor, k)
        return weight / factor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        layer = ctx.layer
        matrix = isinstance(layer, LipschitzLinear) or getattr(layer, "is_matrix", False)
        if ctx.scalars is not None:
            (weight,) = ctx.saved_tensors
            factor, k = ctx.scalars
            gw = grad / factor
            if k:
                coef = float(torch.dot(grad.reshape(-1), weight.reshape(-1))) * k
                if matrix:
                    gw.view(gw.shape[0], -1).addr_(layer.u, layer.v, alpha=-coef)
                else:
                    gw.sub_(layer._dsigma(weight), alpha=coef)
            return gw, None
        weight, factor, k = ctx.saved_tensors
        gw = grad / factor
        coef = torch.dot(grad.reshape(-1), weight.reshape(-1)).mul_(k)
        if matrix:
            gw.view(gw.shape[0], -1).addr_(layer.u * coef, layer.v, alpha=-1.0)
        else:
            gw.sub_(layer._dsigma(weight).mul_(coef))
        return gw, None


class LipschitzLinear(nn.Linear, _SpectralNorm):
    """``nn.Linear`` with ``Lip <= coeff`` by soft spectral normalisation (the matrix norm).

    Args:
        coeff: target bound c on the operator norm.
        n_iterations: power iterations at every training forward (0: only
            through :func:`update_lipschitz`).
        tol: optional relative tolerance that stops iterating early.
        max_iterations: the cap used when iterating to ``tol``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, coeff: float = 0.97,
                 n_iterations: int = 1, tol: float | None = None, max_iterations: int = 200):
        super().__init__(in_features, out_features, bias=bias)
        self._init_spectral(coeff, n_iterations, tol, max_iterations)
        self.register_buffer("u", _normalize(torch.randn(out_features)))
        self.register_buffer("v", _normalize(torch.randn(in_features)))
        self.register_buffer("sigma", torch.zeros(()))
        # Start close to the true norm, so that the first steps are already constrained.
        self.power_iteration(max_iterations, tol=1e-4)

    def _op(self, v, w):
        return w @ v

    def _op_t(self, u, w):
        return w.t() @ u

    def _sigma(self, w):
        return torch.dot(self.u, w @ self.v)

    def lipschitz_constant(self) -> float:
        # The matrix is small: its exact spectral norm is cheap and a true upper bound.
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.normalized_weight(), ord=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coeff={self.coeff}, n_iterations={self.n_iterations}"


class LipschitzConv2d(nn.Conv2d, _SpectralNorm):
    """``nn.Conv2d`` whose *convolution operator* has norm ``<= coeff``.

    Args:
        input_size: ``(H, W)`` of the inputs. The operator norm depends on it
            (through the padding at the border); when ``None`` it is taken from
            the first forward. A 1x1 convolution with stride 1 needs none (its
            operator norm is the matrix norm).
        coeff, n_iterations, tol, max_iterations: as :class:`LipschitzLinear`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, *, input_size: tuple[int, int] | None = None, coeff: float = 0.97,
                 n_iterations: int = 1, tol: float | None = None, max_iterations: int = 200):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        if self.groups != 1 or self.dilation != (1, 1) or isinstance(self.padding, str):
            raise ValueError("LipschitzConv2d supports groups=1, dilation=1 and integer padding")
        self._init_spectral(coeff, n_iterations, tol, max_iterations)
        self.is_matrix = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        self.conv_strategy = conv_strategy(self)
        self.register_buffer("sigma", torch.zeros(()))
        self.input_size: tuple[int, int] | None = None
        if self.is_matrix:
            self._set_vectors(torch.randn(in_channels), torch.randn(out_channels))
        elif input_size is not None:
            self._init_operator(tuple(input_size))
        else:
            self.register_buffer("u", torch.empty(0))
            self.register_buffer("v", torch.empty(0))

    # -- vectors -----------------------------------------------------------
    def _set_vectors(self, v: torch.Tensor, u: torch.Tensor) -> None:
        for name, t in (("u", u), ("v", v)):
            t = _normalize(t.to(self.weight))
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def _init_operator(self, input_size: tuple[int, int]) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        ho, wo = self._out_size(*self.input_size)
        self._set_vectors(torch.randn(1, self.in_channels, *self.input_size),
                          torch.randn(1, self.out_channels, ho, wo))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Vectors created lazily (first forward) are new tensors that DDP's buffer
            # broadcast does not know: start every rank from rank 0's; the iterations
            # that follow are deterministic on the same weights, so the ranks stay equal.
            for t in (self.u, self.v):
                dist.broadcast(t, src=0)
        self.power_iteration(self.max_iterations, tol=1e-4)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A layer whose input size was inferred lazily must accept saved vectors of any size.
        u = state_dict.get(prefix + "u")
        if not self.is_matrix and u is not None and u.shape != self.u.shape:
            v = state_dict[prefix + "v"]
            self.input_size = tuple(v.shape[-2:])
            self._buffers["u"] = torch.empty_like(u)
            self._buffers["v"] = torch.empty_like(v)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the operator ----------------------------------------------------------
    def _is_matrix_op(self) -> bool:
        return self.is_matrix

    def _op(self, v, w):
        if self.is_matrix:
            return w.flatten(1) @ v
        return conv_forward(self.conv_strategy, self, v, w)

    def _op_t(self, u, w):
        if self.is_matrix:
            return w.flatten(1).t() @ u
        # output_padding restores the rows/columns that a strided conv skips.
        h, wd = self.input_size
        ho, wo = u.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        op = (h + 2 * ph - kh - (ho - 1) * sh, wd + 2 * pw - kw - (wo - 1) * sw)
        return conv_input_grad(self.conv_strategy, self, u, w, op)

    def _sigma(self, w):
        return (self.u * self._op(self.v, w)).sum()

    def _dsigma(self, w):
        if self.is_matrix:
            return torch.outer(self.u, self.v).view_as(w)
        return conv_weight_grad(self.conv_strategy, self, self.u, self.v, w)

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_matrix:
            size = tuple(x.shape[-2:])
            if self.input_size is None:
                self._init_operator(size)
            elif size != self.input_size:
                raise ValueError(f"LipschitzConv2d was normalised for inputs of size {self.input_size}, "
                                 f"got {size}: its operator norm depends on the input size")
        return super().weight_for(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_for(x), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, coeff={self.coeff}, n_iterations={self.n_iterations}, "
                f"input_size={self.input_size}")


LIPSCHITZ_LAYERS = (LipschitzLinear, LipschitzConv2d)


def update_lipschitz(module: nn.Module, n_iterations: int | None = None, tol: float | None = None) -> int:
    """Run power iterations on every spectrally normalised layer inside ``module``.

    Called by the tasks after each optimiser step (and before evaluation), so
    the vectors track the weights. A convolution whose input size is not known
    yet (before its first forward) is skipped. Returns the largest number of
    iterations a layer ran.
    """
    most = 0
    for m in module.modules():
        if isinstance(m, LipschitzConv2d) and not m.is_matrix and m.input_size is None:
            continue
        if isinstance(m, LIPSCHITZ_LAYERS):
            most = max(most, m.power_iteration(n_iterations, tol=tol))
    return most
