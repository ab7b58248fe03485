"""The two sides of every comparison, built from ONE settings object so they
cannot drift apart: an iresflow flow (components from ``iresflow.nn``) and the
normflows reference (``normflows.flows.Residual`` around ``LipschitzMLP`` /
``LipschitzCNN``, a port of the Residual Flows code).

How the shared settings map onto each library
=============================================

=====================  ===========================================  =============================================
setting                iresflow                                     normflows
=====================  ===========================================  =============================================
g (toy)                ``MLPResidual(dim, hidden, preact=True)``    ``LipschitzMLP([dim, *hidden, dim])``
                       (act before every linear, like normflows)    (Swish before every InducedNormLinear)
g (image)              ``ConvResidual(C, (H, W), hidden,            ``LipschitzCNN([C, h, h, C], [3, 1, 3])``
                       kernel_sizes=(3,1,3), preact=True)``
activation             ``lipswish``                                 ``Swish`` (= LipSwish: x sigmoid(b x) / 1.1)
Lipschitz coefficient  ``coeff=c`` per linear map                   ``lipschitz_const=c`` per linear map
Lipschitz upkeep       default ``converged``: every map's top       ``update_lipschitz(model, k)`` after each
                       singular pair after each optimizer step      optimizer step (its forward does none)
                       (``keep_up_lipschitz``, as the tasks do);
                       variant ``papers_upkeep``: ``n_iterations=k``
                       power iterations inside each training forward
log-det estimator      ``russian_roulette``, geometric p, one       ``Residual(n_dist="geometric", geom_p=p,
                       Gaussian probe, ``n_exact_terms=3`` (the     n_exact_terms=2, n_samples=1)``
                       same term distribution as normflows' "2",
                       see ``match_normflows_terms``)
gradient mode          ``gradient="memory_efficient"``              ``reduce_memory=True`` (= ``neumann_grad`` and
                       (Neumann gradient computed in the forward)   ``grad_in_forward``)
ActNorm                ``iresflow.nn.layers.ActNorm`` after block   ``normflows.flows.ActNorm`` after block
loss                   -mean log p(x), standard normal prior        ``NormalizingFlow.forward_kld`` (same)
optimizer              Adam(lr)                                     Adam(lr)
=====================  ===========================================  =============================================

Both sides record how many series terms each block used per step, so the
harness can *check* that the estimators cost the same on average (a
geometric distribution can be defined on {0,1,..} or {1,2,..}: a silent
off-by-one there would change the cost by a whole term).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class FlowSettings:
    """Everything that defines a benchmarked training step (both libraries)."""

    kind: str = "toy"                     # "toy" (MLP on R^dim) or "image" (conv on C x H x W)
    dim: int = 2
    in_shape: tuple = (1, 28, 28)
    n_blocks: int = 16
    hidden: Any = (128, 128, 128)         # MLP widths, or conv hidden channels (int)
    kernel_sizes: tuple = (3, 1, 3)
    activation: str = "lipswish"
    coeff: float = 0.9
    n_power_iterations: int = 5
    estimator: str = "russian_roulette"   # or "power_series" (truncated, deterministic)
    n_exact_terms: int = 2
    geom_p: float = 0.5
    # iresflow's own n_exact_terms; None -> same as normflows' *distribution of
    # terms* (see match_normflows_terms), an int -> that value as given.
    ires_n_exact_terms: int | None = None
    n_terms: int = 5                      # power_series only
    gradient: str = "memory_efficient"    # backprop | neumann | memory_efficient
    actnorm: bool = True
    batch: int = 512
    lr: float = 1e-3

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.kind == "toy":
            d.pop("in_shape"), d.pop("kernel_sizes")
        else:
            d.pop("dim")
        return d

    def with_(self, **kw) -> "FlowSettings":
        return replace(self, **kw)

    @property
    def shape(self) -> tuple:
        return (self.dim,) if self.kind == "toy" else tuple(self.in_shape)


# --------------------------------------------------------------------------- data
def toy_batch(n: int, device, seed: int = 0) -> torch.Tensor:
    """8 Gaussians on a circle of radius 2 sqrt 2 (the usual 2D test density)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[math.cos(a), math.sin(a)] for a in
                            [k * math.pi / 4 for k in range(8)]]) * 2 * math.sqrt(2)
    idx = torch.randint(0, 8, (n,), generator=g)
    x = centers[idx] + 0.5 / math.sqrt(2) * torch.randn(n, 2, generator=g)
    return x.to(device)


def image_batch(n: int, shape, device, seed: int = 0) -> torch.Tensor:
    """Dequantised-looking images in (0, 1) (speed does not depend on the pixels)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, (n, *shape), generator=g).float() + torch.rand(n, *shape, generator=g)) / 256
    return x.to(device)


def batch_for(s: FlowSettings, device, seed: int = 0) -> torch.Tensor:
    return toy_batch(s.batch, device, seed) if s.kind == "toy" else image_batch(s.batch, s.in_shape, device, seed)


# --------------------------------------------------------------------------- iresflow
class IresflowChain(nn.Module):
    """A plain stack of iresflow flow layers with a standard-normal prior."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward_and_logdet(self, x):
        logdet = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for layer in self.layers:
            x, ld = layer.forward_and_logdet(x)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x):
        z, logdet = self.forward_and_logdet(x)
        z = z.flatten(1)
        return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi)) + logdet

    @property
    def blocks(self):
        from iresflow.nn.block import InvertibleResidualBlock

        return [m for m in self.layers if isinstance(m, InvertibleResidualBlock)]


def match_normflows_terms(n_exact_terms: int) -> int:
    """iresflow ``n_exact_terms`` giving the SAME distribution of series terms as
    normflows' ``Residual(n_dist="geometric", n_exact_terms=k)``.

    normflows draws ``N ~ numpy.random.geometric(p)`` on {1, 2, ...} and uses
    ``k + N`` terms: term ``k + 1`` is always included (weight 1/P = 1), so it
    is ``k + 1`` exact terms plus a tail with P(term k+1+j) = (1-p)^j. iresflow
    counts N from 0 (P(N >= j) = (1-p)^j), so the same estimator -- same terms,
    same weights, same cost -- is iresflow's ``n_exact_terms = k + 1``.
    """
    return n_exact_terms + 1


def iresflow_estimator_node(s: FlowSettings) -> dict:
    if s.estimator == "russian_roulette":
        k = match_normflows_terms(s.n_exact_terms) if s.ires_n_exact_terms is None else s.ires_n_exact_terms
        return {"name": "russian_roulette", "distribution": "geometric", "p": s.geom_p,
                "n_terms": k, "trace": {"name": "hutchinson", "n_probes": 1, "probe": "gaussian"},
                "gradient": s.gradient}
    if s.estimator == "power_series":
        return {"name": "power_series", "n_terms": s.n_terms,
                "trace": {"name": "hutchinson", "n_probes": 1, "probe": "gaussian"}, "gradient": s.gradient}
    raise ValueError(f"unknown estimator {s.estimator!r}")


def iresflow_residual(s: FlowSettings) -> nn.Module:
    from iresflow.nn.residual import ConvResidual, MLPResidual
    from iresflow.registry import factory

    if s.kind == "toy":
        return MLPResidual(s.dim, hidden=tuple(s.hidden), activation=factory("activation", s.activation), coeff=s.coeff,
                           n_iterations=s.n_power_iterations, preact=True)
    c, h, w = s.in_shape
    return ConvResidual(c, input_size=(h, w), hidden_channels=int(s.hidden),
                        kernel_sizes=tuple(s.kernel_sizes), activation=factory("activation", s.activation),
                        coeff=s.coeff,
                        n_iterations=s.n_power_iterations, preact=True)


def build_iresflow(s: FlowSettings, device, compiled: bool = False) -> IresflowChain:
    import iresflow.nn  # noqa: F401 - registers the built-ins
    from iresflow.nn.block import InvertibleResidualBlock
    from iresflow.nn.layers import ActNorm
    from iresflow.nn.solvers import FixedPointSolver
    from iresflow.registry import factory

    layers: list[nn.Module] = []
    for _ in range(s.n_blocks):
        layers.append(InvertibleResidualBlock(iresflow_residual(s), solver=FixedPointSolver(),
                                              estimator=factory("estimator", iresflow_estimator_node(s))))
        if s.actnorm:
            layers.append(ActNorm(s.shape[0]))
    flow = IresflowChain(layers).to(device).train()
    if compiled:  # what ResidualFlow(compile=True) does
        from iresflow.nn.activations import compile_activations

        compile_activations(flow)
    return flow


def strip_spectral_norm(module: nn.Module) -> nn.Module:
    """Replace every Lipschitz layer by a plain ``nn.Linear`` / ``nn.Conv2d`` holding
    the *normalised* weight, in place: the same function, minus the normalisation."""
    from iresflow.nn.lipschitz import LipschitzConv2d, LipschitzLinear

    for name, child in list(module.named_children()):
        if isinstance(child, (LipschitzLinear, LipschitzConv2d)):
            with torch.no_grad():
                w = child.normalized_weight() if hasattr(child, "normalized_weight") else child.weight
                w = w() if callable(w) and not isinstance(w, torch.Tensor) else w
                if isinstance(child, LipschitzLinear):
                    new = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                else:
                    new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                    stride=child.stride, padding=child.padding,
                                    bias=child.bias is not None)
                new = new.to(child.weight.device, child.weight.dtype)
                new.weight.copy_(w.detach())
                if child.bias is not None:
                    new.bias.copy_(child.bias.detach())
            setattr(module, name, new)
        else:
            strip_spectral_norm(child)
    return module


# --------------------------------------------------------------------------- ablations
@contextlib.contextmanager
def without_dense_jacobian():
    """iresflow without its small-dimension path (the per-sample Jacobian from D
    forward-mode passes, for inputs of D <= min(n, 8) dimensions): every series term
    is then a vector-Jacobian product through the network."""
    from iresflow.nn.logdet import fused

    old = fused.DENSE_JACOBIAN_MAX_DIM
    fused.DENSE_JACOBIAN_MAX_DIM = 0
    try:
        yield
    finally:
        fused.DENSE_JACOBIAN_MAX_DIM = old


@contextlib.contextmanager
def without_onednn():
    """iresflow with the fused path's matrix products on torch's own ``mm`` (MKL on CPU)
    instead of oneDNN (``iresflow.nn.logdet.gemm``)."""
    from iresflow.nn.logdet import gemm

    old = gemm.onednn_enabled
    gemm.onednn_enabled = False
    try:
        yield
    finally:
        gemm.onednn_enabled = old


@contextlib.contextmanager
def generic_autograd_path():
    """iresflow with its structured fast paths off: residual functions look opaque,
    so the estimators use autograd (vjps of g(x), double backward for the Neumann
    gradient), as for any user-defined g."""
    from iresflow.nn.residual import ResidualFunction

    old = ResidualFunction.linear_chain
    ResidualFunction.linear_chain = lambda self: None
    try:
        yield
    finally:
        ResidualFunction.linear_chain = old


@contextlib.contextmanager
def papers_upkeep():
    """iresflow with the papers' upkeep (``upkeep: power_iteration``): the settings' power iterations in
    every training forward, as normflows runs them after every step, instead of converging every map's
    top singular pair (the bound is then not held at every step: ``benchmarks/bound.py``)."""
    from iresflow.nn.spectral_norm import _SpectralNorm

    old = _SpectralNorm.converges
    _SpectralNorm.converges = property(lambda self: False)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        _SpectralNorm.converges = old  # type: ignore[method-assign]


def iresflow_terms(flow: IresflowChain) -> float | None:
    """Mean number of series terms the blocks used in the last step (None if not exposed)."""
    ns = [getattr(b.estimator, "last_n_terms", None) for b in flow.blocks]
    ns = [int(n) for n in ns if n is not None]
    return sum(ns) / len(ns) if ns else None


# --------------------------------------------------------------------------- normflows
def build_normflows(s: FlowSettings, device, *, n_power_series=None, reduce_memory=None):
    """normflows ``NormalizingFlow`` at the same settings.

    ``s.gradient``: memory_efficient -> ``reduce_memory=True`` (neumann_grad and
    grad_in_forward); backprop -> ``reduce_memory=False`` (its basic estimator
    with create_graph). normflows has no 'neumann without grad-in-forward' switch
    on ``Residual``; for that mode the iResBlock flags are set directly.
    """
    import normflows as nf

    if s.estimator == "power_series" and n_power_series is None:
        n_power_series = s.n_terms
    if reduce_memory is None:
        reduce_memory = s.gradient != "backprop"
    flows = []
    for _ in range(s.n_blocks):
        if s.kind == "toy":
            net = nf.nets.LipschitzMLP([s.dim, *s.hidden, s.dim], lipschitz_const=s.coeff,
                                       max_lipschitz_iter=s.n_power_iterations, init_zeros=True)
        else:
            c = s.in_shape[0]
            h = int(s.hidden)
            net = nf.nets.LipschitzCNN([c, h, h, c], list(s.kernel_sizes), lipschitz_const=s.coeff,
                                       max_lipschitz_iter=s.n_power_iterations, init_zeros=True)
        res = nf.flows.Residual(net, reduce_memory=reduce_memory, geom_p=s.geom_p,
                                n_exact_terms=s.n_exact_terms, n_dist="geometric",
                                n_power_series=n_power_series)
        if s.gradient == "neumann":
            res.iresblock.neumann_grad, res.iresblock.grad_in_forward = True, False
        flows.append(res)
        if s.actnorm:
            flows.append(nf.flows.ActNorm(s.dim) if s.kind == "toy" else nf.flows.ActNorm((s.in_shape[0], 1, 1)))
    q0 = nf.distributions.DiagGaussian(s.shape, trainable=False)
    return nf.NormalizingFlow(q0=q0, flows=flows).to(device).train()


def normflows_terms(model, s: FlowSettings) -> float | None:
    import normflows as nf

    blocks = [f.iresblock for f in model.flows if isinstance(f, nf.flows.Residual)]
    if not blocks:
        return None
    if blocks[0].n_power_series is not None:
        return float(blocks[0].n_power_series)
    return float(sum(b.last_n_samples.max().item() + b.n_exact_terms for b in blocks) / len(blocks))


# --------------------------------------------------------------------------- steps
@dataclass
class Side:
    """One implementation ready to be timed: ``step()`` is one full training step."""

    name: str
    model: nn.Module
    step: Callable[[], float]
    terms: Callable[[], float | None]
    term_log: list = field(default_factory=list)

    def logged_step(self):
        loss = self.step()
        t = self.terms()
        if t is not None:
            self.term_log.append(t)
        return loss


def iresflow_side(s: FlowSettings, device, x: torch.Tensor, model=None, compiled: bool = False) -> Side:
    from iresflow.nn.lipschitz import keep_up_lipschitz

    flow = model if model is not None else build_iresflow(s, device, compiled=compiled)
    opt = torch.optim.Adam(flow.parameters(), lr=s.lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = -flow.log_prob(x).mean()
        loss.backward()
        opt.step()
        # the tasks' upkeep after every step (the default: every map's top singular pair converged, dense
        # maps of one shape together; the papers' upkeep: nothing here, its iterations run in the forward)
        keep_up_lipschitz(flow, 0)
        return loss.detach()

    return Side("iresflow", flow, step, lambda: iresflow_terms(flow))


def normflows_side(s: FlowSettings, device, x: torch.Tensor, **kw) -> Side:
    import normflows as nf

    model = build_normflows(s, device, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.forward_kld(x)
        loss.backward()
        opt.step()
        # normflows' forward runs no power iteration: its training loop does
        # them here, k per step -- the same count iresflow runs in its forward.
        nf.utils.update_lipschitz(model, s.n_power_iterations)
        return loss.detach()

    return Side("normflows", model, step, lambda: normflows_terms(model, s))


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- common random numbers
class CommonDraws:
    """The same Russian-roulette draws on both sides, step by step (common random numbers):
    the k-th training step of every side uses the k-th list of per-block draws, so a pair of
    steps does the same work and its time ratio measures speed, not luck.

    normflows draws ``N ~ geometric(p)`` on {1, 2, ...} (``np.random.geometric``) on top of
    its ``n_exact_terms``; iresflow counts its ``N`` from 0 on top of one more exact term
    (:func:`match_normflows_terms`): the same draw is ``N - 1`` there.
    """

    def __init__(self, p: float, n_blocks: int, seed: int):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.p, self.n_blocks = p, n_blocks
        self.lists: list[list[int]] = []

    def draws(self, k: int) -> list[int]:
        while len(self.lists) <= k:
            self.lists.append([int(n) for n in self.rng.geometric(self.p, self.n_blocks)])
        return self.lists[k]

    def iresflow(self, side: Side) -> Side:
        """``side`` with every step's roulette draws taken from the common lists."""
        count = [0]
        estimators = [b.estimator for b in side.model.blocks]
        plain = side.step

        def step():
            it = iter(self.draws(count[0]))
            count[0] += 1
            for est in estimators:
                est.sample_n = (lambda n=next(it): n - 1)  # noqa: B008  (binds this estimator's draw now)
            return plain()

        return replace(side, step=step)

    def normflows(self, side: Side) -> Side:
        import normflows.flows.residual as nf_residual
        import numpy as np

        count = [0]
        plain = side.step

        def step():
            it = iter(self.draws(count[0]))
            count[0] += 1
            original = nf_residual.geometric_sample
            nf_residual.geometric_sample = lambda p, m: np.array([next(it) for _ in range(m)])
            try:
                return plain()
            finally:
                nf_residual.geometric_sample = original

        return replace(side, step=step)
