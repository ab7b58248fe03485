"""The machinery of spectral normalisation shared by the normalised layers (:mod:`iresflow.nn.lipschitz`).

- :class:`_SpectralNorm`: the persistent vectors ``u``, ``v`` and the estimate ``sigma`` of a layer's
  operator norm; power iteration (fixed count, or to a tolerance), Lanczos for a convolution operator,
  and the upkeep that keeps them up with the weight;
- :func:`converge_matrices`: the converged upkeep of dense maps of one shape at once (exact for a small
  side, else one batched Lanczos run);
- :class:`_SoftNormalize`: ``W / max(1, <u, W v> / c)`` with its gradient in closed form;
- :func:`paused_power_iteration`: no power iteration inside (see its docstring).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from iresflow.nn.lanczos import top_singular_pairs

__all__ = ["UPKEEPS", "converge_matrices", "paused_power_iteration"]

#: how the power-iteration vectors follow the weights (see :mod:`iresflow.nn.lipschitz`)
UPKEEPS = ("converged", "power_iteration")

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

# The converged upkeep takes the exact top eigenvector of a matrix's Gram matrix when its smaller
# side is at most this long (measured on the CPU after Adam-sized steps: 0.6 ms against Lanczos' 0.9 ms
# at 96 x 96; at 128 x 128 Lanczos is cheaper, 0.8 ms against 1.1 ms).
_EXACT_MAX_DIM = 96


def _kept_after_load(module: "_SpectralNorm", incompatible_keys) -> None:
    """(A module-level function: the hook is pickled with the layer, e.g. into spawned processes.)"""
    module.mark_kept()


def _distributed() -> bool:
    """Several processes: there the tasks' upkeep after every step keeps the ranks' vectors identical (a
    tensor's version counter, which the forward's own check reads, can differ between ranks)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def _converged(change: float, last_change: float, tol: float) -> bool:
    """Whether power iteration has converged to ``tol``: the estimates rise geometrically to sigma, so
    with successive changes ``d_(k-1)``, ``d_k`` (ratio ``q``) what is still to come is about
    ``d_k q / (1 - q)`` -- far more than ``d_k`` when the top singular values are close."""
    if change == 0.0:
        return True
    if math.isinf(last_change):  # (one change alone says nothing about the rate)
        return False
    q = change / last_change
    return q < 1.0 and change * q / (1.0 - q) <= tol


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

    def _init_spectral(self, coeff: float, n_iterations: int, tol: float | None, max_iterations: int,
                       upkeep: str = "converged", upkeep_tol: float = 1e-5):
        if not coeff > 0:
            raise ValueError(f"coeff must be positive, got {coeff}")
        if n_iterations < 0 or max_iterations < 1:
            raise ValueError("n_iterations must be >= 0 and max_iterations >= 1")
        if upkeep not in UPKEEPS:
            raise ValueError(f"upkeep must be one of {', '.join(UPKEEPS)}, not {upkeep!r}")
        if not 0 < float(upkeep_tol) < 1:
            raise ValueError(f"upkeep_tol must lie in (0, 1), got {upkeep_tol}")
        self.coeff = float(coeff)
        self.n_iterations = int(n_iterations)
        self.tol = tol
        self.max_iterations = int(max_iterations)
        self.upkeep = upkeep
        self.upkeep_tol = float(upkeep_tol)
        self._kept_version: int | None = None  # the weight's version the vectors were converged for
        # a loaded checkpoint's vectors belong to its weights (saved after the upkeep): nothing to redo
        self.register_load_state_dict_post_hook(_kept_after_load)

    def mark_kept(self) -> None:
        """Declare the vectors converged for the current weight (after loading, or restoring, both)."""
        self._kept_version = self.weight._version

    @property
    def converges(self) -> bool:
        return self.upkeep == "converged"

    def keep_up(self, n_iterations: int | None = None) -> int:
        """The upkeep after a change of the weight: converge the vectors (``converged``), or run
        ``n_iterations`` fixed iterations (``power_iteration``). Returns how many ran."""
        if self.converges:
            return self.top_singular_pair()
        self.last_upkeep_iterations = self.power_iteration(n_iterations)
        return self.last_upkeep_iterations

    @torch.no_grad()
    def top_singular_pair(self) -> int:
        """The operator's top singular pair into ``sigma``, ``u``, ``v`` in float64, warm-started from the
        vectors (:func:`converge_matrices`; a convolution by Lanczos on its operator, to the relative
        residual ``upkeep_tol``): no lag, and ``sigma = ||W v||`` is never above the norm. Returns the
        number of Lanczos steps."""
        if self._is_matrix_op():
            return converge_matrices([self])
        self._redraw_vanished_vectors()
        w = self.weight.detach().double()
        v_shape, u_shape = self.v.shape, self.u.shape

        def op(x):
            return self._op(x.view(v_shape), w).reshape(1, -1)

        def op_t(y):
            return self._op_t(y.view(u_shape), w).reshape(1, -1)

        sigma, u, v, steps = top_singular_pairs(op, op_t, self.v.double().reshape(1, -1),
                                                self.u.double().reshape(1, -1), tol=self.upkeep_tol,
                                                max_steps=min(self.max_iterations, 64))
        self._keep(float(sigma[0]), u[0], v[0], steps)
        return steps

    def _keep(self, sigma: float, u: torch.Tensor, v: torch.Tensor, steps: int) -> None:
        """Store a converged pair (in place: the buffers stay shared with DDP and the state dict)."""
        if sigma > _EPS:
            self.u.copy_(u.view_as(self.u))
            self.v.copy_(v.view_as(self.v))
        else:  # a zero map: sigma 0 normalises nothing; its vectors stay unit vectors
            sigma = 0.0
        self.sigma.fill_(sigma)
        self.mark_kept()
        self.last_upkeep_iterations = steps  # (what benchmarks/bound.py reports)

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
        self._redraw_vanished_vectors()
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
        last_change = math.inf
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
                change = abs(new - prev)
                if _converged(change, last_change, tol * max(new, _EPS)):
                    break
                # the first change also holds the weights' move since the stored estimate: not a rate
                prev, last_change = new, (change if done > 1 else math.inf)
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

    @torch.no_grad()
    def _redraw_vanished_vectors(self) -> None:
        """A zero weight (a block initialised as the identity) maps every vector to 0: iterating on it
        leaves ``u = v = 0``, which would normalise nothing once the weight moves. Such vectors are
        drawn again, from a generator seeded by their shape (every DDP rank draws the same)."""
        for name in ("u", "v"):
            t = getattr(self, name)
            if t.numel() and float(t.norm()) <= _EPS:
                gen = torch.Generator().manual_seed(1 + t.numel())
                t.copy_(_normalize(torch.randn(t.shape, generator=gen, dtype=t.dtype)).to(t.device))

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

    def _maybe_iterate(self) -> None:
        if not (self.training and torch.is_grad_enabled()) or _PAUSED.get():
            return
        if self.converges:
            if self.weight._version != self._kept_version and not _distributed():
                self.keep_up()  # moved since the last upkeep (a loop without the tasks): converge first
        elif self.n_iterations > 0:
            self._iterate_in_forward()

    def _iterate_in_forward(self) -> None:
        """The training forward's power iterations: the vectors the normalisation divides by."""
        self.power_iteration(self.n_iterations, tol=self.tol)

    def _converge_at_start(self) -> None:
        """At construction (and when a convolution learns its input size): vectors converged to the
        initial weight, in either upkeep."""
        if self.converges:
            self.keep_up()
        else:
            self.power_iteration(self.max_iterations, tol=1e-4)
            self.mark_kept()

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight that ``forward(x)`` applies: runs the training-time power
        iterations, then returns :meth:`normalized_weight`. Code that applies the
        layer's linear map itself (the log-det estimators' Jacobian products)
        calls this once per forward instead of ``forward``."""
        self._maybe_iterate()
        return self.normalized_weight()


@torch.no_grad()
def converge_matrices(layers: list[_SpectralNorm]) -> int:
    """The converged upkeep of dense (and 1x1) maps whose matrices have one shape, all at once: each one's
    top singular pair in float64, exactly (the top eigenvector of its small Gram matrix) when a side is at
    most ``_EXACT_MAX_DIM``, else by one Lanczos run for the whole stack, warm-started from the vectors, to
    the first layer's ``upkeep_tol``. ``sigma = ||W v||`` is never above the norm. Returns the steps taken."""
    for layer in layers:
        layer._redraw_vanished_vectors()
    ms = torch.stack([layer.weight.detach().reshape(layer.weight.shape[0], -1) for layer in layers]).double()
    if min(ms.shape[1:]) <= _EXACT_MAX_DIM:
        sigma, u, v = _exact_top_pairs(ms)
        steps = 1
    else:
        first = layers[0]
        sigma, u, v, steps = top_singular_pairs(*_stacked_products(ms),
                                                torch.stack([layer.v for layer in layers]).double(),
                                                torch.stack([layer.u for layer in layers]).double(),
                                                tol=first.upkeep_tol, max_steps=min(first.max_iterations, 64))
    for i, (layer, value) in enumerate(zip(layers, sigma.tolist())):  # (one host read for the stack)
        layer._keep(value, u[i], v[i], steps)
    return steps


def _stacked_products(ms: torch.Tensor):
    """``W v`` and ``W^T u`` for a stack of matrices ``[B, rows, cols]`` and vectors ``[B, .]``."""
    if ms.shape[0] == 1:  # one matrix: plain matrix-vector products
        return (lambda x: torch.mv(ms[0], x[0]).unsqueeze(0)), (lambda y: torch.mv(ms[0].t(), y[0]).unsqueeze(0))
    # (broadcasts and sums: on the CPU a batched matrix-vector bmm is several times slower)
    return (lambda x: (ms * x.unsqueeze(1)).sum(-1)), (lambda y: (ms * y.unsqueeze(-1)).sum(1))


def _exact_top_pairs(ms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matrices with a small side: the top eigenvectors of their small Gram matrices, exactly (tiny
    eigendecompositions cost less than Lanczos' steps there). ``(sigma, u, v)``."""
    if ms.shape[2] <= ms.shape[1]:
        v = torch.linalg.eigh(ms.transpose(1, 2) @ ms).eigenvectors[:, :, -1]
    else:
        v = (ms.transpose(1, 2) @ torch.linalg.eigh(ms @ ms.transpose(1, 2)).eigenvectors[:, :, -1:]).squeeze(-1)
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(_EPS)
    u = (ms @ v.unsqueeze(-1)).squeeze(-1)
    sigma = torch.linalg.vector_norm(u, dim=-1)
    return sigma, u / sigma.clamp_min(_EPS).unsqueeze(-1), v


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
        matrix = layer._is_matrix_op()
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
