"""Log-det estimators and gradient modes, against brute-force references in float64.

References: the per-sample Jacobian from torch.autograd.functional.jacobian and
torch.linalg.slogdet. "Basis probes" sqrt(d) e_i (i = 1..d) make Hutchinson's
estimator an exact trace, isolating truncation and Russian-roulette effects
from probe noise.
"""

import math
import weakref

import pytest
import torch
from torch import nn

from iresflow.nn.logdet import ExactLogDet, Hutchinson, PowerSeriesLogDet, RussianRouletteLogDet
from iresflow.registry import build, build_node

from helpers import Opaque

torch.set_num_threads(1)
DT = torch.float64


class ContractiveMLP(nn.Module):
    """``g(x) = W2 tanh(W1 x + b1) + b2`` with ``||W1|| = 1``, ``||W2|| = c``: Lip(g) <= c.
    Acts on the flattened sample, so inputs may have any per-sample shape."""

    def __init__(self, dim, hidden, c, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim, hidden, dtype=DT)
        self.l2 = nn.Linear(hidden, dim, dtype=DT)
        with torch.no_grad():
            for lin, scale in ((self.l1, 1.0), (self.l2, c)):
                w = torch.randn(lin.weight.shape, generator=gen, dtype=DT)
                lin.weight.copy_(scale * w / torch.linalg.matrix_norm(w, ord=2))
                lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=gen, dtype=DT))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.flatten(1)))).view_as(x)


def brute_logdet(g, x):
    jac = torch.stack([torch.autograd.functional.jacobian(lambda t: g(t[None])[0], xi).reshape(
        xi.numel(), xi.numel()) for xi in x])
    eye = torch.eye(jac.shape[-1], dtype=DT)
    return torch.linalg.slogdet(eye + jac).logabsdet


def basis_probes(x):
    d = x[0].numel()
    e = math.sqrt(d) * torch.eye(d, dtype=x.dtype)
    return e[:, None, :].expand(d, x.shape[0], d).reshape(d, *x.shape).contiguous()


def grads(est, g, x, weights=None, **kw):
    """Gradients w.r.t. x and g's parameters of a loss that uses both outputs."""
    x = x.clone().requires_grad_()
    gx, logdet = est(g, x, **kw)
    w = torch.ones_like(logdet) if weights is None else weights
    loss = (w * logdet).sum() + 0.5 * (gx ** 2).sum()
    return logdet.detach(), torch.autograd.grad(loss, [x, *g.parameters()])


# --------------------------------------------------------------------------- exact


def test_exact_matches_bruteforce_slogdet():
    g = ContractiveMLP(6, 16, 0.9)
    x = torch.randn(5, 2, 3, dtype=DT)  # non-flat samples
    gx, logdet = ExactLogDet()(g, x)
    ref = brute_logdet(g, x)
    err = (logdet - ref).abs().max().item()
    print(f"exact vs slogdet(brute-force Jacobian): max error {err:.1e}")
    assert logdet.shape == (5,) and torch.allclose(gx, g(x))
    assert err < 1e-12


def test_exact_gradient_matches_bruteforce():
    g = ContractiveMLP(3, 8, 0.9)
    x = torch.randn(4, 3, dtype=DT)
    _, (gx_, *gp) = grads(ExactLogDet(), g, x)
    xr = x.clone().requires_grad_()
    loss = brute_logdet_graph(g, xr).sum() + 0.5 * (g(xr) ** 2).sum()
    ref = torch.autograd.grad(loss, [xr, *g.parameters()])
    for a, b in zip([gx_, *gp], ref):
        assert torch.allclose(a, b, atol=1e-12)


def brute_logdet_graph(g, x):
    jac = torch.autograd.functional.jacobian(lambda t: g(t).sum(0), x, create_graph=True)
    jac = jac.permute(1, 0, 2)  # [B, out, in]
    return torch.linalg.slogdet(torch.eye(x.shape[1], dtype=DT) + jac).logabsdet


def test_exact_without_grad_returns_values_only():
    g = ContractiveMLP(4, 8, 0.9)
    x = torch.randn(3, 4, dtype=DT)
    with torch.no_grad():
        gx, logdet = ExactLogDet()(g, x)
    assert not gx.requires_grad and not logdet.requires_grad
    assert torch.allclose(logdet, brute_logdet(g, x), atol=1e-12)


# --------------------------------------------------------------------------- power series


def test_power_series_error_decreases_with_terms():
    g = ContractiveMLP(4, 16, 0.9)
    x = torch.randn(8, 4, dtype=DT)
    ref = brute_logdet(g, x)
    probes = basis_probes(x)
    lip = 0.9
    errors = {}
    for n in (1, 2, 4, 8, 16):
        with torch.no_grad():
            _, est = PowerSeriesLogDet(n_terms=n)(g, x, probes=probes)
        errors[n] = (est - ref).abs().max().item()
        # |tr(J^k)| <= d Lip^k bounds the dropped tail.
        bound = sum(4 * lip ** k / k for k in range(n + 1, 400))
        assert errors[n] <= bound
    print("power series |error| (exact traces) by n:", {n: f"{e:.1e}" for n, e in errors.items()})
    es = list(errors.values())
    assert all(a > b for a, b in zip(es, es[1:]))
    assert errors[16] < 1e-8


def test_power_series_many_random_probes():
    # Batch of identical samples, one Gaussian probe each: iid estimates, so a standard error.
    g = ContractiveMLP(4, 16, 0.9)
    x0 = torch.randn(1, 4, dtype=DT)
    ref = brute_logdet(g, x0).item()
    x = x0.expand(4000, 4)
    report = {}
    for n in (1, 2, 4, 8, 16):
        with torch.no_grad():
            _, est = PowerSeriesLogDet(n_terms=n)(g, x)
        se = est.std().item() / math.sqrt(est.numel())
        report[n] = ((est.mean().item() - ref), se)
    print("power series, 4000 Gaussian probes: (error, standard error) by n:",
          {n: f"({e:+.1e}, {s:.1e})" for n, (e, s) in report.items()})
    assert abs(report[16][0]) < 4 * report[16][1]
    assert abs(report[1][0]) > abs(report[16][0])


def test_several_probes_average_single_probe_estimates():
    g = ContractiveMLP(6, 8, 0.9)
    x = torch.randn(3, 2, 3, dtype=DT)
    probes = torch.randn(4, *x.shape, dtype=DT)
    est = PowerSeriesLogDet(n_terms=5, trace=Hutchinson(n_probes=4))
    gx, together = est(g, x, probes=probes)
    singles = torch.stack([PowerSeriesLogDet(n_terms=5)(g, x, probes=p)[1] for p in probes])
    assert torch.allclose(together, singles.mean(0), atol=1e-13)
    assert torch.allclose(gx, g(x))
    # Rademacher probes sample +-1.
    est_r = PowerSeriesLogDet(n_terms=2, trace=Hutchinson(n_probes=3, probe="rademacher"))
    _, ld = est_r(g, x)
    assert ld.shape == (3,)


# --------------------------------------------------------------------------- Russian roulette


@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_roulette_tail_probabilities(distribution):
    est = RussianRouletteLogDet(distribution=distribution, p=0.4, lam=1.5)
    torch.manual_seed(0)
    draws = torch.tensor([est.sample_n() for _ in range(20000)], dtype=DT)
    for j in range(5):
        emp = (draws >= j).double().mean().item()
        se = math.sqrt(est.tail_prob(j) * (1 - est.tail_prob(j)) / draws.numel()) + 1e-12
        assert abs(emp - est.tail_prob(j)) < 4 * se
    exact = 0.6 ** 3 if distribution == "geometric" else 1 - math.exp(-1.5) * (1 + 1.5 + 1.5 ** 2 / 2)
    assert est.tail_prob(3) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_roulette_expectation_over_n_is_exact(distribution, monkeypatch):
    """E_N[estimate] summed analytically over N (pmf x estimate(N)) with exact traces:
    no sampling noise, so the reweighting must be exactly right."""
    g = ContractiveMLP(4, 16, 0.9)
    x = torch.randn(3, 4, dtype=DT)
    ref = brute_logdet(g, x)
    est = RussianRouletteLogDet(distribution=distribution, p=0.5, lam=2.0, n_terms=2)
    probes = basis_probes(x)
    mean = torch.zeros(3, dtype=DT)
    for n in range(60):
        pmf = est.tail_prob(n) - est.tail_prob(n + 1)
        monkeypatch.setattr(est, "sample_n", lambda n=n: n)
        with torch.no_grad():
            mean += pmf * est(g, x, probes=probes)[1]
    err = (mean - ref).abs().max().item()
    print(f"{distribution}: |E_N[roulette] - exact| = {err:.1e}")
    assert err < 1e-10


@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_roulette_unbiased_monte_carlo(distribution):
    g = ContractiveMLP(4, 16, 0.9)
    x0 = 0.3 * torch.randn(1, 4, dtype=DT)
    ref = brute_logdet(g, x0).item()
    # N is shared by a batch, so the independent draws are the calls; within a call a
    # batch of identical samples averages 64 Rademacher probes.
    est = RussianRouletteLogDet(distribution=distribution, p=0.5, lam=1.0, n_terms=1,
                                trace=Hutchinson(probe="rademacher"))
    x = x0.expand(64, 4)
    with torch.no_grad():
        draws = torch.stack([est(g, x)[1].mean() for _ in range(2000)])
    se = draws.std().item() / math.sqrt(draws.numel())
    bias = (draws.mean().item() - ref) / se
    with torch.no_grad():
        _, first = PowerSeriesLogDet(n_terms=1)(g, x0, probes=basis_probes(x0))
    roulette_part = ref - first.item()
    print(f"{distribution}: roulette mean - exact = {bias:+.2f} standard errors (se {se:.1e}); "
          f"the randomised terms sum to {roulette_part / se:+.1f} se")
    assert abs(bias) < 3
    # Dropping (or doubling) the randomised terms would be caught many times over.
    assert abs(roulette_part) > 10 * se


def test_roulette_eval_mode_uses_more_exact_terms(monkeypatch):
    g = ContractiveMLP(4, 16, 0.9)
    x = torch.randn(3, 4, dtype=DT)
    est = RussianRouletteLogDet(n_terms=1, eval_n_terms=25)
    monkeypatch.setattr(est, "sample_n", lambda: 3)
    est(g, x)
    assert est.last_n_terms == 1 + 3
    est.eval()
    with torch.no_grad():
        _, ld = est(g, x, probes=basis_probes(x))
    assert est.last_n_terms == 25 + 3
    assert torch.allclose(ld, brute_logdet(g, x), atol=1e-9)


def test_estimators_have_no_parameters_and_build_from_registry():
    for name in ("exact", "power_series", "russian_roulette"):
        est = build("estimator", name)
        assert list(est.parameters()) == []
    est = build_node("estimator", {"name": "russian_roulette", "distribution": "poisson",
                                   "gradient": "memory_efficient"})
    assert est.distribution == "poisson" and est.gradient == "memory_efficient"
    with pytest.raises(ValueError, match="gradient"):
        PowerSeriesLogDet(gradient="nope")
    with pytest.raises(ValueError, match="gradient"):
        ExactLogDet(gradient="nope")
    # No series: every mode is the exact backprop gradient, so a config switch to exact works.
    assert ExactLogDet(gradient="neumann").gradient == "neumann"


# --------------------------------------------------------------------------- gradient modes


@pytest.mark.parametrize("mode", ["neumann", "memory_efficient"])
@pytest.mark.parametrize("uniform", [True, False])
def test_neumann_gradients_equal_backprop_of_one_more_term(mode, uniform):
    """With exact traces, d/dθ sum_{k=1}^{n+1} (-1)^(k+1) tr(J^k)/k = sum_{k=0}^{n} (-1)^k tr(J^k dJ):
    the Neumann gradient from n value terms (vjps v^T J^0..n) equals backprop of n+1 terms."""
    g = ContractiveMLP(4, 16, 0.9)
    x = torch.randn(5, 4, dtype=DT)
    probes = basis_probes(x)
    w = None if uniform else torch.linspace(0.5, 2.0, 5, dtype=DT)  # per-sample loss weights
    n = 4
    val, got = grads(PowerSeriesLogDet(n_terms=n, gradient=mode), g, x, w, probes=probes)
    val_bp, _ = grads(PowerSeriesLogDet(n_terms=n, gradient="backprop"), g, x, w, probes=probes)
    _, ref = grads(PowerSeriesLogDet(n_terms=n + 1, gradient="backprop"), g, x, w, probes=probes)
    _, off = grads(PowerSeriesLogDet(n_terms=n, gradient="backprop"), g, x, w, probes=probes)
    assert torch.allclose(val, val_bp, atol=1e-14)  # same value as the plain series
    worst = max((a - b).abs().max().item() for a, b in zip(got, ref))
    wrong_index = max((a - b).abs().max().item() for a, b in zip(got, off))
    print(f"{mode} (uniform={uniform}): max |grad - backprop(n+1)| = {worst:.1e}; "
          f"vs backprop(n): {wrong_index:.1e}")
    assert worst < 1e-12
    assert wrong_index > 1e-6  # the index matters at this tolerance


@pytest.mark.parametrize("mode", ["neumann", "memory_efficient"])
def test_neumann_gradient_with_a_random_probe_is_unbiased_not_equal(mode):
    # With one random probe the Neumann and backprop gradients differ (trace cyclicity only
    # holds in expectation), but both must be close to the exact gradient on average.
    g = ContractiveMLP(3, 8, 0.9)
    x = torch.randn(1, 3, dtype=DT).expand(3000, 3).contiguous()
    _, exact = grads(ExactLogDet(), g, x)
    torch.manual_seed(1)
    _, got = grads(PowerSeriesLogDet(n_terms=30, gradient=mode), g, x)
    # Parameter gradients are sums over the batch: compare the means per sample.
    for a, b in zip(got[1:], exact[1:]):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 0.05


@pytest.mark.parametrize("mode", ["neumann", "memory_efficient"])
def test_roulette_neumann_gradient_expectation_is_exact(mode, monkeypatch):
    g = ContractiveMLP(4, 16, 0.9)
    x = torch.randn(3, 4, dtype=DT)
    probes = basis_probes(x)
    _, exact = grads(ExactLogDet(), g, x)
    est = RussianRouletteLogDet(p=0.5, n_terms=2, gradient=mode)
    total = [torch.zeros_like(t) for t in exact]
    for n in range(60):
        pmf = est.tail_prob(n) - est.tail_prob(n + 1)
        monkeypatch.setattr(est, "sample_n", lambda n=n: n)
        _, gr = grads(est, g, x, probes=probes)
        total = [t + pmf * a for t, a in zip(total, gr)]
    worst = max((a - b).abs().max().item() for a, b in zip(total, exact))
    print(f"roulette {mode}: |E_N[grad] - exact grad| = {worst:.1e}")
    assert worst < 1e-9


def test_exact_gradient_close_to_long_backprop_series():
    g = ContractiveMLP(4, 16, 0.9)
    x = torch.randn(3, 4, dtype=DT)
    _, exact = grads(ExactLogDet(), g, x)
    _, series = grads(PowerSeriesLogDet(n_terms=30), g, x, probes=basis_probes(x))
    worst = max((a - b).abs().max().item() for a, b in zip(series, exact))
    print(f"exact vs backprop power series (30 terms): max grad difference {worst:.1e}")
    assert worst < 1e-6


@pytest.mark.parametrize("mode", ["backprop", "neumann", "memory_efficient"])
def test_gradient_modes_without_input_grad_reach_parameters(mode):
    g = ContractiveMLP(4, 8, 0.9)
    x = torch.randn(3, 4, dtype=DT)  # a data batch: no grad
    gx, logdet = PowerSeriesLogDet(n_terms=3, gradient=mode)(g, x, probes=basis_probes(x))
    (logdet.sum() + gx.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


@pytest.mark.parametrize("mode", ["backprop", "neumann", "memory_efficient"])
def test_no_grad_gives_same_values_without_graph(mode):
    g = ContractiveMLP(4, 8, 0.9)
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    probes = torch.randn(2, 3, 4, dtype=DT)
    est = PowerSeriesLogDet(n_terms=4, trace=Hutchinson(n_probes=2), gradient=mode)
    _, with_grad = est(g, x, probes=probes)
    with torch.no_grad():
        gx, without = est(g, x, probes=probes)
    assert not gx.requires_grad and not without.requires_grad
    assert torch.allclose(with_grad.detach(), without, atol=1e-14)


# --------------------------------------------------------------------------- memory


class SavedBytes:
    """Bytes packed for backward while active (``total``) and still alive afterwards (``live``)."""

    def __init__(self):
        self.total = 0
        self.live = 0

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, t):
        nbytes = t.numel() * t.element_size()
        self.total += nbytes
        self.live += nbytes
        box = _Box(t)
        weakref.finalize(box, self._free, nbytes)
        return box

    def _free(self, nbytes):
        self.live -= nbytes

    @staticmethod
    def _unpack(box):
        return box.t


class _Box:
    def __init__(self, t):
        self.t = t


def saved_bytes(mode, n):
    g = ContractiveMLP(16, 64, 0.9)
    x = torch.randn(32, 16, dtype=DT, requires_grad=True)
    est = PowerSeriesLogDet(n_terms=n, gradient=mode)
    with SavedBytes() as meter:
        gx, logdet = est(g, x)
    live = meter.live  # what is held until backward
    (logdet.sum() + gx.sum()).backward()  # still works after measuring
    return meter.total, live


def test_memory_constant_in_number_of_terms():
    res = {(m, n): saved_bytes(m, n) for m in ("backprop", "neumann", "memory_efficient")
           for n in (2, 20)}
    for m in ("backprop", "neumann", "memory_efficient"):
        (t2, l2), (t20, l20) = res[(m, 2)], res[(m, 20)]
        print(f"{m}: packed {t2} -> {t20} bytes, held after forward {l2} -> {l20} bytes (n=2 -> 20)")
    for m in ("neumann", "memory_efficient"):
        assert res[(m, 20)][0] <= 1.2 * res[(m, 2)][0]
        assert res[(m, 20)][1] <= 1.2 * res[(m, 2)][1]
    assert res[("backprop", 20)][0] > 4 * res[("backprop", 2)][0]
    # Backward-in-forward frees the second-order graph before returning.
    assert res[("memory_efficient", 20)][1] < res[("neumann", 20)][1]


# --------------------------------------------------------------------------- no grad: no power iteration


def _lipschitz_g(dtype=DT):
    from iresflow.nn.residual import MLPResidual

    torch.manual_seed(0)
    g = MLPResidual(3, (8, 8), coeff=0.9, n_iterations=3).to(dtype).train()
    with torch.no_grad():  # the vectors no longer match the weights: an iteration would move them
        for m in g.modules():
            if hasattr(m, "weight_for"):
                m.weight.add_(torch.randn_like(m.weight))
    return g


def _vectors(g):
    return [t.clone() for m in g.modules() if hasattr(m, "weight_for") for t in (m.u, m.v, m.sigma)]


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("estimator", ["exact", "power_series", "russian_roulette"])
@pytest.mark.parametrize("mode", ["backprop", "neumann", "memory_efficient"])
def test_estimator_under_no_grad_runs_no_power_iteration(estimator, mode, structured):
    """Like a plain g(x) under no_grad (which runs none), even where the estimator re-enables grad."""
    g = _lipschitz_g()
    target = g if structured else Opaque(g)
    x = torch.randn(4, 3, dtype=DT)
    before = _vectors(g)
    with torch.no_grad():
        expected = g(x)
        assert all(torch.equal(a, b) for a, b in zip(before, _vectors(g)))
        gx, logdet = build("estimator", estimator, gradient=mode)(target, x)
    assert all(torch.equal(a, b) for a, b in zip(before, _vectors(g)))
    assert not logdet.requires_grad and torch.allclose(gx, expected)
    # with grad on, a training forward iterates, as g(x) does
    build("estimator", estimator, gradient=mode)(target, x)
    assert not all(torch.equal(a, b) for a, b in zip(before, _vectors(g)))


# --------------------------------------------------------------------------- exact: what is caught


class _CountedFailure(torch.autograd.Function):
    """Identity whose backward fails for real (an allocation no machine can serve)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _CountedFailure.calls += 1
        torch.empty(1 << 62, dtype=torch.uint8)  # RuntimeError: the allocator cannot serve it
        return grad


class _UnbatchableBackward(torch.autograd.Function):
    """Identity whose backward writes into a fixed buffer: vmap has no rule for that."""

    @staticmethod
    def forward(ctx, x):
        ctx.buffer = torch.empty_like(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.buffer.copy_(grad)
        return ctx.buffer.clone()


def test_exact_jacobian_does_not_retry_a_real_failure():
    """An error inside the batched vector-Jacobian products (here a real out-of-memory) is raised
    as it is, once -- not taken for a missing batching rule and retried row by row."""
    g = ContractiveMLP(3, 8, 0.9)
    x = torch.randn(4, 3, dtype=DT)
    _CountedFailure.calls = 0
    with pytest.raises(RuntimeError, match="allocat"):
        ExactLogDet()(lambda t: g(_CountedFailure.apply(t)), x)
    assert _CountedFailure.calls == 1


def test_exact_jacobian_falls_back_where_vmap_has_no_rule():
    g = ContractiveMLP(3, 8, 0.9)
    x = torch.randn(4, 3, dtype=DT)
    _, logdet = ExactLogDet()(lambda t: g(_UnbatchableBackward.apply(t)), x)
    torch.testing.assert_close(logdet, brute_logdet(g, x), rtol=0, atol=1e-12)
