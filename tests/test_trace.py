"""Trace estimators (kind ``trace``): unbiasedness, exactness, variance, and the fast paths.

References: traces of explicit matrices and of materialised Jacobians (float64); means of
many independent draws are compared within a few standard errors.
"""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from iresflow import registry
from iresflow.nn.logdet import ExactTrace, Hutchinson, HutchPlusPlus, PowerSeriesLogDet, RussianRouletteLogDet
from iresflow.nn.lipschitz import update_lipschitz
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.registry import factory

from helpers import Opaque, logdet_and_grads

DT = torch.float64
ROOT = Path(__file__).resolve().parent.parent
RANDOM = {
    "hutchinson (gaussian)": lambda: Hutchinson(n_probes=2),
    "hutchinson (rademacher)": lambda: Hutchinson(n_probes=2, probe="rademacher"),
    "hutchpp (gaussian)": lambda: HutchPlusPlus(rank=2, n_probes=2),
    "hutchpp (rademacher)": lambda: HutchPlusPlus(rank=2, n_probes=3, probe="rademacher"),
}


class MatrixProducts:
    """``w^T A_b`` for explicit per-sample matrices ``A [B, d, d]``."""

    def __init__(self, a):
        self.a = a

    def vjp(self, w, create_graph=False):
        return torch.einsum("pbi,bij->pbj", w, self.a)


def trace_estimate(trace, a):
    """One draw of ``tr(A_b)`` for every sample ``b``."""
    x = torch.zeros(a.shape[0], a.shape[1], dtype=a.dtype)
    vectors, weights = trace.probes(x, MatrixProducts(a))
    quad = torch.einsum("pbi,bij,pbj->pb", vectors, a, vectors)
    return (weights[:, None] * quad).sum(0)


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_trace_estimators_are_unbiased(name):
    torch.manual_seed(0)
    a = torch.randn(3, 6, 6, dtype=DT)  # not symmetric
    exact = torch.diagonal(a, dim1=1, dim2=2).sum(1)
    trace = RANDOM[name]()
    draws = torch.stack([trace_estimate(trace, a) for _ in range(4000)])
    se = draws.std(0) / math.sqrt(draws.shape[0])
    z = ((draws.mean(0) - exact) / se).abs().max().item()
    print(f"{name}: |mean - tr(A)| <= {z:.2f} standard errors")
    assert z < 4
    assert draws.std(0).min() > 0  # random indeed


def test_exact_trace_is_the_trace():
    torch.manual_seed(0)
    a = torch.randn(3, 7, 7, dtype=DT)
    torch.testing.assert_close(trace_estimate(ExactTrace(), a), torch.diagonal(a, dim1=1, dim2=2).sum(1),
                               rtol=0, atol=1e-13)


def test_hutchpp_is_exact_when_the_sketch_spans_everything():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 3, dtype=DT)
    torch.testing.assert_close(trace_estimate(HutchPlusPlus(rank=3), a), torch.diagonal(a, dim1=1, dim2=2).sum(1),
                               rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- inside the log-det series


class Linear(nn.Module):
    """``g(x) = x W^T``: the same Jacobian ``W`` at every point."""

    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w)

    def forward(self, x):
        return x @ self.weight.t()


def truncated_series(w, n):
    """``sum_{k=1}^n (-1)^(k+1) tr(W^k) / k`` of the materialised matrix."""
    power, total = torch.eye(w.shape[0], dtype=w.dtype), 0.0
    for k in range(1, n + 1):
        power = power @ w
        total += (-1) ** (k + 1) * torch.trace(power).item() / k
    return total


def decaying_matrix(d, seed=0):
    """Symmetric, spectrum 0.8 * 0.5^i: where a low-rank sketch captures almost all of the trace."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    return q @ torch.diag(0.8 * 0.5 ** torch.arange(d, dtype=DT)) @ q.t()


@pytest.mark.parametrize("name", sorted(RANDOM) + ["exact"])
def test_logdet_with_each_trace_estimator_is_unbiased(name):
    torch.manual_seed(0)
    w = torch.randn(5, 5, dtype=DT)
    w = 0.9 * w / torch.linalg.matrix_norm(w, ord=2)
    g = Linear(w)
    trace = ExactTrace() if name == "exact" else RANDOM[name]()
    est = PowerSeriesLogDet(n_terms=3, trace=trace)
    x = torch.zeros(3000, 5, dtype=DT)  # identical samples, independent probes: independent draws
    with torch.no_grad():
        _, logdet = est(g, x)
    ref = truncated_series(w, 3)
    if name == "exact":
        torch.testing.assert_close(logdet, torch.full_like(logdet, ref), rtol=0, atol=1e-12)
        return
    se = logdet.std().item() / math.sqrt(logdet.numel())
    print(f"{name}: mean - exact series = {(logdet.mean().item() - ref) / se:+.2f} standard errors")
    assert abs(logdet.mean().item() - ref) < 4 * se


def test_exact_trace_matches_the_materialised_jacobian():
    """With the exact trace the series is the series of the true per-sample Jacobian (a
    nonlinear g, so J differs between samples): sum_k (-1)^(k+1) tr(J_b^k) / k."""
    torch.manual_seed(0)
    g = MLPResidual(4, (16,), activation=factory("activation", "elu"), coeff=0.9, n_iterations=0).double()
    x = torch.randn(6, 4, dtype=DT)
    with torch.no_grad():
        _, logdet = PowerSeriesLogDet(n_terms=6, trace=ExactTrace())(g, x)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda t: g(t[None])[0], xi) for xi in x])
    ref = torch.stack([torch.tensor(truncated_series(j, 6), dtype=DT) for j in jac])
    torch.testing.assert_close(logdet, ref, rtol=0, atol=1e-13)


def test_hutchpp_has_lower_variance_at_equal_cost():
    """Hutch++ with a rank-4 sketch and 4 deflated probes costs 4 + n (4 + 4) products; Hutchinson
    with 9 probes costs 9 n (n = 4 terms: 36 and 36). On a decaying spectrum the sketch holds
    almost all of the trace, so the deflated remainder is small."""
    d, n = 32, 4
    g = Linear(decaying_matrix(d))
    x = torch.zeros(2000, d, dtype=DT)
    costs, variances = {}, {}
    for name, trace in (("hutchinson", Hutchinson(n_probes=9)), ("hutchpp", HutchPlusPlus(rank=4, n_probes=4))):
        costs[name] = trace.n_sketch(x) + n * trace.n_vectors(x)
        torch.manual_seed(1)
        with torch.no_grad():
            _, logdet = PowerSeriesLogDet(n_terms=n, trace=trace)(g, x)
        variances[name] = logdet.var().item()
    print(f"equal cost {costs}: variance of the log-det {variances}")
    assert costs["hutchinson"] == costs["hutchpp"]
    assert variances["hutchpp"] < 0.1 * variances["hutchinson"]


# --------------------------------------------------------------------------- fast paths, every trace estimator


def _residual(kind):
    torch.manual_seed(0)
    if kind == "mlp-small":  # 3 features: the materialised-Jacobian path
        g, x = MLPResidual(3, (12, 12), coeff=0.9, n_iterations=0, preact=True), torch.randn(4, 3)
    elif kind == "mlp":
        g, x = MLPResidual(10, (12,), coeff=0.9, n_iterations=0, preact=True), torch.randn(4, 10)
    else:
        g, x = ConvResidual(2, (4, 4), 3, coeff=0.9, n_iterations=0), torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        for m in g.modules():
            if hasattr(m, "weight_for"):
                m.weight.mul_(3.0)
    update_lipschitz(g, n_iterations=20)
    return g.double(), x.double()


@pytest.mark.parametrize("kind", ["mlp-small", "mlp", "conv"])
@pytest.mark.parametrize("trace", ["hutchinson", "exact", "hutchpp"])
@pytest.mark.parametrize("mode", ["backprop", "neumann", "memory_efficient"])
def test_fast_paths_equal_autograd_for_every_trace_estimator(kind, trace, mode):
    g, x = _residual(kind)
    node = {"hutchinson": {"name": "hutchinson", "n_probes": 2, "probe": "rademacher"},
            "exact": {"name": "exact"}, "hutchpp": {"name": "hutchpp", "rank": 2, "n_probes": 1}}[trace]
    est = registry.build_node("estimator", {"name": "russian_roulette", "n_terms": 2, "gradient": mode,
                                            "trace": node})
    for weights in (torch.ones(x.shape[0], dtype=DT), torch.rand(x.shape[0], dtype=DT)):
        fast = logdet_and_grads(est, g, x, weights, seed=3)
        ref = logdet_and_grads(est, Opaque(g), x, weights, seed=3)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- components and configs


def test_trace_is_a_registered_kind_chosen_by_a_node():
    assert {"hutchinson", "exact", "hutchpp"} <= set(registry.available("trace"))
    est = registry.build_node("estimator", {"name": "power_series", "trace": {"name": "hutchpp", "rank": 3}})
    assert isinstance(est.trace, HutchPlusPlus) and est.trace.rank == 3
    assert isinstance(PowerSeriesLogDet().trace, Hutchinson) and PowerSeriesLogDet().trace.n_probes == 1
    with pytest.raises(registry.RegistryError, match="hutchpp"):
        registry.build_node("estimator", {"name": "power_series", "trace": {"name": "hutchp"}})
    with pytest.raises(registry.RegistryError, match="n_probes"):  # the renamed key is refused with the remedy
        registry.build_node("estimator", {"name": "power_series", "n_probes": 2})


@pytest.mark.parametrize("config", ["flow_fc", "flow_multiscale"])
def test_model_configs_choose_the_trace_estimator(config):
    node = OmegaConf.load(ROOT / "configs" / "model" / f"{config}.yaml").estimator
    est = registry.build_node("estimator", node)
    assert isinstance(est, RussianRouletteLogDet) and isinstance(est.trace, Hutchinson)
    assert est.trace.n_probes == 1 and est.trace.probe == "gaussian"


def test_trace_sweep_spec_asks_which_estimator(tmp_path):
    from iresflow.sweep import load_spec, plan

    path = ROOT / "sweeps" / "ablation_trace.yaml"
    assert path.read_text().startswith("# Question:")
    spec = load_spec(path)
    runs = plan(spec, tmp_path)
    traces = spec["parameters"]["model.estimator.trace"]["values"]
    assert len(runs) == len(traces) * len(spec["parameters"]["model.estimator.gradient"]["values"])
    for node in traces:  # every value is a buildable trace estimator
        assert isinstance(registry.build_node("trace", node), (Hutchinson, ExactTrace, HutchPlusPlus))
