"""The compile option (``model.compile: true``): the same log-likelihood and gradients as eager,
for every estimator, trace estimator and gradient mode, on CPU (torch.compile through gcc).

Compiling the activation pieces takes a while the first time, so this is one slow test.
"""

import copy

import pytest
import torch

from iresflow.models.flow import ResidualFlow
from iresflow.nn.activations import ElementwiseActivation
from iresflow.registry import factory

CASES = [
    ({"name": "exact"}, "backprop"),
    *[({"name": "power_series", "n_terms": 4}, mode) for mode in ("backprop", "neumann", "memory_efficient")],
    *[({"name": "russian_roulette", "n_terms": 2, "trace": trace}, "memory_efficient")
      for trace in ({"name": "hutchinson", "n_probes": 2}, {"name": "exact"}, {"name": "hutchpp", "rank": 1})],
]


def _step(flow, x, seed):
    flow.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    lp = flow.log_prob(x)
    (-lp.mean()).backward()
    with torch.no_grad():
        torch.manual_seed(seed)
        flow.eval()
        lp_eval = flow.log_prob(x)
        flow.train()
    return [lp.detach(), lp_eval, *[p.grad.clone() for p in flow.parameters()]]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
def test_compiled_model_equals_eager(shape):
    for node, mode in CASES:
        if shape != (2,) and node["name"] == "exact":
            continue
        torch.manual_seed(0)
        eager = ResidualFlow(in_shape=shape, n_blocks=2, hidden=[16, 16] if len(shape) == 1 else 4, n_scales=1,
                             estimator=factory("estimator", {**node, "gradient": mode}), n_iterations=0)
        compiled = copy.deepcopy(eager)
        for m in compiled.modules():  # what compile=True does at construction
            if isinstance(m, ElementwiseActivation):
                m.compiled = True
        x = torch.rand(8, *shape) if len(shape) == 3 else torch.randn(8, *shape)
        eager.log_prob(x), compiled.log_prob(x)  # ActNorm's data-dependent initialisation
        for a, b in zip(_step(eager, x, seed=1), _step(compiled, x, seed=1)):
            torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-5, msg=f"{node} {mode}")


def test_compile_option_switches_the_activations():
    flow = ResidualFlow(in_shape=(2,), n_blocks=1, hidden=[8, 8], compile=True)
    acts = [m for m in flow.modules() if isinstance(m, ElementwiseActivation)]
    assert acts and all(m.compiled for m in acts)
    assert not any(m.compiled for m in ResidualFlow(in_shape=(2,), n_blocks=1, hidden=[8, 8]).modules()
                   if isinstance(m, ElementwiseActivation))
