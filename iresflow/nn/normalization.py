"""How a residual function makes its linear maps (kind ``normalization``).

A normalisation is a small object with two factory methods,
``linear(in_features, out_features, coeff)`` and
``conv2d(in_channels, out_channels, kernel_size, padding, input_size, coeff)``,
which every residual function calls for every linear map of ``g``. Choosing
it is one config line, ``model.normalization: {name: ...}``:

- ``operator`` (default): ``W <- W / max(1, sigma(W) / c)`` with ``sigma`` the
  norm of the *operator* the layer applies (for a k x k convolution, the
  convolution map at the real input size): ``Lip <= c`` is certified.
- ``none``: the i-ResNet paper's "Vanilla" -- the same layers and parameters
  with no constraint. The layers still estimate their real operator norm by
  power iteration, for reporting only, so ``g.lipschitz_bound()`` is the
  estimated product of the real norms (above 1 when it is).
- ``kernel``: ``sigma`` is the norm of the reshaped ``[out, in * k * k]``
  kernel matrix (what ``torch.nn.utils.spectral_norm`` normalises). For dense
  and 1x1 layers that is the operator norm; for a k x k convolution it is
  **not a bound**: the operator norm can be several times larger. The layers
  measure the real operator norm of the weight they apply, so the reported
  bound stays honest and ``kernel_ratio()`` tells by how much ``c`` is missed.

Every layer is an ``nn.Linear`` / ``nn.Conv2d`` subclass with ``weight_for(x)``
(the log-det estimators' fast Jacobian path uses it) and
``lipschitz_constant()`` (the reported operator norm of the applied weight).
``constrains`` says whether a normalisation bounds ``Lip(g)`` at all and
``certifies`` whether the reported bound is guaranteed to be ``<= c``; a model
that needs ``Lip(g) < 1`` (a power-series log-det) checks ``constrains``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from iresflow.nn.lipschitz import UPKEEPS, LipschitzConv2d, LipschitzLinear
from iresflow.registry import Factory, instance, register

__all__ = [
    "Normalization", "OperatorNormalization", "NoNormalization", "KernelNormalization",
    "UnconstrainedLinear", "UnconstrainedConv2d", "KernelNormConv2d", "resolve_normalization",
]

_EPS = 1e-12


class Normalization:
    """Base class: the power-iteration settings shared by the built-in layers.

    Args:
        n_iterations: with ``upkeep: power_iteration``, power iterations at every training
            forward (the tasks add ``lipschitz_iterations`` after each optimiser step).
        tol: optional relative tolerance that stops those iterations early.
        max_iterations: the cap when iterating to a tolerance (and at construction).
        upkeep: ``converged`` (default): after every change of the weights the top singular
            pair is recomputed (maps with a side of at most 96: exactly, an eigendecomposition
            of the small Gram matrix; larger maps and k x k convolutions: Lanczos on the smaller
            side, warm-started), so the applied map is within ``c`` at every step;
            ``power_iteration``: the papers' fixed count (an ablation: the bound lags
            fast-moving weights).
        upkeep_tol: ``converged``: the relative residual at which Lanczos stops (1e-5: sigma
            to about 1e-10).
    """

    #: the layers bound Lip(g) by c (False: unconstrained, e.g. the vanilla ResNet)
    constrains = True
    #: the reported bound is guaranteed to be <= c (False: an ablation that may exceed it)
    certifies = True

    def __init__(self, n_iterations: int = 1, tol: float | None = None, max_iterations: int = 200,
                 upkeep: str = "converged", upkeep_tol: float = 1e-5):
        if upkeep not in UPKEEPS:
            raise ValueError(f"upkeep must be one of {', '.join(UPKEEPS)}, not {upkeep!r}")
        self.n_iterations, self.tol, self.max_iterations = int(n_iterations), tol, int(max_iterations)
        self.upkeep, self.upkeep_tol = upkeep, float(upkeep_tol)

    def _iteration_settings(self) -> dict[str, Any]:
        return {"n_iterations": self.n_iterations, "tol": self.tol, "max_iterations": self.max_iterations,
                "upkeep": self.upkeep, "upkeep_tol": self.upkeep_tol}

    def linear(self, in_features: int, out_features: int, coeff: float) -> nn.Linear:
        raise NotImplementedError

    def conv2d(self, in_channels: int, out_channels: int, kernel_size: int, padding: int,
               input_size: Sequence[int] | None, coeff: float) -> nn.Conv2d:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


@register("normalization", "operator",
          description="W / max(1, sigma/c), sigma the operator norm (power iteration on the conv map): "
                      "certified Lip <= c")
class OperatorNormalization(Normalization):
    """Spectral normalisation by the operator norm (:mod:`iresflow.nn.lipschitz`)."""

    def linear(self, in_features, out_features, coeff):
        return LipschitzLinear(in_features, out_features, coeff=coeff, **self._iteration_settings())

    def conv2d(self, in_channels, out_channels, kernel_size, padding, input_size, coeff):
        return LipschitzConv2d(in_channels, out_channels, kernel_size, padding=padding, input_size=input_size,
                               coeff=coeff, **self._iteration_settings())


# ----------------------------------------------------------------------------- none (vanilla)
class UnconstrainedLinear(LipschitzLinear):
    """``nn.Linear`` applying its raw weight; ``lipschitz_constant()`` is its exact matrix norm.

    The power-iteration buffers are kept, so checkpoints and parameter counts match
    :class:`LipschitzLinear`. They only report, so a training forward leaves them alone:
    ``update_lipschitz`` (after every optimiser step, and before evaluations) keeps them current.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **settings: Any):
        super().__init__(in_features, out_features, bias, coeff=math.inf, **settings)

    def normalized_weight(self) -> torch.Tensor:
        return self.weight

    def _maybe_iterate(self) -> None:
        pass  # the raw weight is applied: nothing to normalise by (the reported norm is exact)


class UnconstrainedConv2d(LipschitzConv2d):
    """``nn.Conv2d`` applying its raw weight; ``lipschitz_constant()`` is a certified upper bound of
    its operator norm at the real input size (the circular convolution's norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, bias: bool = True,
                 **settings: Any):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias, coeff=math.inf,
                         **settings)

    def normalized_weight(self) -> torch.Tensor:
        return self.weight

    def _maybe_iterate(self) -> None:
        pass  # the raw weight is applied; the report-only vectors follow update_lipschitz


@register("normalization", "none",
          description="no constraint (the i-ResNet paper's Vanilla): same layers and parameters; the real "
                      "operator norms are estimated and reported, nothing is certified")
class NoNormalization(Normalization):
    """The unconstrained ResNet: every linear map applies its raw weight.

    ``coeff`` is ignored. Nothing pretends to be invertible: the reported bound
    is the product of the estimated real operator norms, the inverse solver
    reports when it does not converge, and a flow refuses a series log-det
    estimator (which needs ``Lip(g) < 1`` to converge).
    """

    constrains = False
    certifies = False

    def linear(self, in_features, out_features, coeff):
        return UnconstrainedLinear(in_features, out_features, **self._iteration_settings())

    def conv2d(self, in_channels, out_channels, kernel_size, padding, input_size, coeff):
        return UnconstrainedConv2d(in_channels, out_channels, kernel_size, padding=padding,
                                   input_size=input_size, **self._iteration_settings())


# ----------------------------------------------------------------------------- kernel matrix
class KernelNormConv2d(LipschitzConv2d):
    """``nn.Conv2d`` normalised by the norm of its reshaped kernel matrix ``K = W.view(out, -1)``:
    ``W <- W / max(1, sigma(K) / c)``.

    ``sigma(K)`` comes from power iteration on ``K`` (buffers ``kernel_u``,
    ``kernel_v``). The layer's inherited operator vectors ``u``, ``v`` iterate
    on the convolution map at the real input size, so :meth:`lipschitz_constant`
    reports the operator norm of the weight the layer really applies (which,
    for a k x k kernel, may exceed ``c``: :meth:`kernel_ratio`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0, bias: bool = True, *,
                 input_size: Sequence[int] | None = None, coeff: float = 0.97, **settings: Any):
        # Built lazily first, so that the kernel vectors exist before any iteration runs.
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias, input_size=None,
                         coeff=coeff, **settings)
        rows, cols = self.weight.shape[0], self.weight[0].numel()
        self.register_buffer("kernel_u", F.normalize(torch.randn(rows), dim=0))
        self.register_buffer("kernel_v", F.normalize(torch.randn(cols), dim=0))
        self.register_buffer("kernel_sigma", torch.zeros(()))
        self._iterate_kernel(self.max_iterations, tol=1e-4)
        if input_size is not None and not self.is_matrix:
            self._init_operator(tuple(input_size))

    @torch.no_grad()
    def _iterate_kernel(self, n_iterations: int, tol: float | None) -> None:
        k = self.weight.detach().flatten(1)
        u, v, prev = self.kernel_u, self.kernel_v, float(self.kernel_sigma)
        for _ in range(n_iterations):
            v = F.normalize(k.t() @ u, dim=0, eps=_EPS)
            ku = k @ v
            sigma = ku.norm()
            u = ku / sigma.clamp_min(_EPS)
            if tol is not None:
                if abs(float(sigma) - prev) <= tol * max(float(sigma), _EPS):
                    break
                prev = float(sigma)
        if n_iterations > 0:
            self.kernel_u.copy_(u)
            self.kernel_v.copy_(v)
            self.kernel_sigma.copy_(sigma)

    @torch.no_grad()
    def power_iteration(self, n_iterations: int | None = None, tol: float | None = None) -> int:
        """Iterate the kernel-matrix vectors (which normalise) and the operator vectors (which report)."""
        tol = self.tol if tol is None else tol
        count = n_iterations if n_iterations is not None else (self.max_iterations if tol is not None
                                                                 else self.n_iterations)
        self._iterate_kernel(count, tol)
        if not self.is_matrix and self.input_size is None:
            return count  # the operator vectors are made at the first forward
        return max(count, super().power_iteration(n_iterations, tol))

    def _iterate_in_forward(self) -> None:
        # the kernel vectors normalise; the operator vectors only report (update_lipschitz keeps them)
        self._iterate_kernel(self.n_iterations, self.tol)

    def kernel_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``<kernel_u, K kernel_v>``: the estimate of ``sigma(K)``, differentiable in the weight."""
        return torch.dot(self.kernel_u, weight.flatten(1) @ self.kernel_v)

    def normalized_weight(self) -> torch.Tensor:
        with torch.autocast(self.weight.device.type, enabled=False):
            return self.weight / torch.clamp(self.kernel_norm(self.weight) / self.coeff, min=1.0)

    def kernel_ratio(self) -> float:
        """The (power-iteration) operator norm of the kernel-normalised weight divided by ``c`` (1: the
        bound holds exactly). ``lipschitz_constant()`` is the certified upper bound, as for every layer."""
        if not self.is_matrix and self.input_size is None:
            return math.nan  # not measured before the first forward (the input size is unknown)
        with torch.no_grad():
            return float(self._sigma(self.normalized_weight())) / self.coeff


@register("normalization", "kernel",
          description="W / max(1, sigma(K)/c), K the reshaped kernel matrix (torch spectral_norm): NOT a bound "
                      "for k x k convs; reports the real operator norm")
class KernelNormalization(Normalization):
    """The ablation that shows why the operator norm matters: normalise convolutions by their
    reshaped kernel matrix. Dense layers and 1x1 convolutions are the same as ``operator``
    (their matrix is their operator); k x k convolutions get :class:`KernelNormConv2d`.
    """

    certifies = False

    def linear(self, in_features, out_features, coeff):
        return LipschitzLinear(in_features, out_features, coeff=coeff, **self._iteration_settings())

    def conv2d(self, in_channels, out_channels, kernel_size, padding, input_size, coeff):
        if int(kernel_size) == 1 and int(padding) == 0:
            return LipschitzConv2d(in_channels, out_channels, 1, input_size=input_size, coeff=coeff,
                                   **self._iteration_settings())
        return KernelNormConv2d(in_channels, out_channels, kernel_size, padding=padding, input_size=input_size,
                                coeff=coeff, **self._iteration_settings())


def resolve_normalization(spec: Any = None, **defaults: Any) -> Normalization:
    """The normalisation a residual function uses: ``None`` -> ``operator`` with ``defaults``
    (the residual's power-iteration settings); a factory is called with ``defaults`` filling
    what its node does not set; a built normalisation is copied as it is."""
    if spec is None:
        return OperatorNormalization(**defaults)
    if isinstance(spec, Factory):
        return spec(**defaults)
    return instance(spec)
