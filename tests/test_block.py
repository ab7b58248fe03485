"""InvertibleResidualBlock: forward, log-det, inverse and component wiring.

The residual function is a contractive MLP built here (weights divided by their
exact spectral norm), independent of iresflow.nn.residual.
"""

import pytest
import torch

from iresflow.nn.block import InvertibleResidualBlock
from iresflow.nn.logdet import ExactLogDet, PowerSeriesLogDet, RussianRouletteLogDet
from iresflow.nn.solvers import AndersonSolver, FixedPointSolver, SolveInfo
from iresflow.registry import factory

from helpers import ContractiveMLP

torch.set_num_threads(1)
DT = torch.float64


def jacobian_logdet(f, x):
    jac = torch.stack([torch.autograd.functional.jacobian(lambda t: f(t[None])[0], xi) for xi in x])
    return torch.linalg.slogdet(jac).logabsdet


def test_forward_and_exact_logdet_match_bruteforce():
    g = ContractiveMLP(3, 8, 0.9)
    block = InvertibleResidualBlock(g, estimator=ExactLogDet())
    x = torch.randn(4, 3, dtype=DT)
    y, logdet = block.forward_and_logdet(x)
    assert torch.allclose(y, x + g(x)) and torch.allclose(block(x), y)
    # log|det J_F| of the whole map F, by brute force.
    assert torch.allclose(logdet, jacobian_logdet(block, x), atol=1e-12)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("c", [0.5, 0.9])
def test_inverse_round_trip_float32(solver, c):
    block = InvertibleResidualBlock(ContractiveMLP(6, 24, c, dtype=torch.float32),
                                    solver=factory("solver", solver))
    x = torch.randn(32, 6)
    y = block(x)
    x_rec = block.inverse(y)
    err = (x_rec - x).abs().max().item()
    info = block.last_solve_info
    print(f"block {solver} c={c}: max error {err:.1e}, {info}")
    assert isinstance(info, SolveInfo) and info.converged
    assert err < 1e-5


def test_inverse_runs_without_grad_and_in_eval_mode():
    g = ContractiveMLP(3, 8, 0.9)
    block = InvertibleResidualBlock(g)
    block.train()
    y = torch.randn(5, 3, dtype=DT, requires_grad=True)
    g.modes.clear()
    x = block.inverse(y)
    assert not x.requires_grad
    assert g.modes and not any(g.modes)  # g evaluated in eval mode during the solve
    assert g.training  # and restored afterwards
    assert block.last_solve_info.evaluations == len(g.modes)


def test_g_evaluated_once_per_forward_and_logdet():
    g = ContractiveMLP(3, 8, 0.9)
    for est in ("exact", "power_series", "russian_roulette"):
        block = InvertibleResidualBlock(g, estimator=factory("estimator", est))
        g.calls = 0
        y, logdet = block.forward_and_logdet(torch.randn(4, 3, dtype=DT))
        assert g.calls == 1 and logdet.shape == (4,)


def test_components_from_objects_and_factories():
    g = ContractiveMLP(3, 8, 0.9)
    default = InvertibleResidualBlock(g)
    assert isinstance(default.solver, FixedPointSolver)
    assert isinstance(default.estimator, RussianRouletteLogDet)
    named = InvertibleResidualBlock(g, solver=factory("solver", "anderson"),
                                    estimator=factory("estimator", "power_series"))
    assert isinstance(named.solver, AndersonSolver)
    assert isinstance(named.estimator, PowerSeriesLogDet)
    node = InvertibleResidualBlock(
        g, solver=factory("solver", {"name": "anderson", "memory": 3, "tol": 1e-8}),
        estimator=factory("estimator", {"name": "russian_roulette", "gradient": "memory_efficient", "n_terms": 3}))
    assert node.solver.memory == 3 and node.solver.tol == 1e-8
    assert node.estimator.gradient == "memory_efficient" and node.estimator.n_terms == 3
    est = ExactLogDet()
    assert InvertibleResidualBlock(g, estimator=est).estimator is est
    assert InvertibleResidualBlock(g).lipschitz_bound() == pytest.approx(0.9)


def test_train_eval_reaches_estimator_and_gradients_flow():
    g = ContractiveMLP(3, 8, 0.9)
    block = InvertibleResidualBlock(g, estimator=RussianRouletteLogDet(gradient="memory_efficient"))
    block.eval()
    assert not block.estimator.training
    block.train()
    assert block.estimator.training
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    y, logdet = block.forward_and_logdet(x)
    (y.sum() + logdet.mean()).backward()
    assert x.grad is not None and all(p.grad is not None for p in g.parameters())
    # Only the estimator's sampling settings, no extra trainable parameters.
    assert {n for n, _ in block.named_parameters()} == {f"g.{n}" for n, _ in g.named_parameters()}
