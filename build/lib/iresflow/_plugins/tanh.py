"""Example plugin: tanh as a formula-defined activation, with the fast log-det paths.

An elementwise activation that subclasses :class:`iresflow.nn.activations.ElementwiseActivation`
and writes its formula -- ``f``, ``f'`` (``df``) and ``f''`` (``d2f``) -- gets everything
else derived: the differentiable ``(f, f')`` the layer-chain Jacobian products use, the
no-graph pieces of the fused memory-efficient path, and ``max_slope()`` to check the
declared Lipschitz constant. ``tests/test_activations.py`` checks this plugin's log-det
and gradients through every fast path against plain autograd.

``tanh' = 1 - tanh^2 <= 1`` (equality at 0), so tanh is 1-Lipschitz; it is smooth, so
the log-det series (which needs a C1 ``g``) applies.
"""

import torch

from iresflow.nn.activations import ElementwiseActivation
from iresflow.registry import register


@register("activation", "tanh", description="tanh: smooth, 1-Lipschitz (example of a formula-defined plugin)")
class Tanh(ElementwiseActivation):
    lipschitz = 1.0

    def f(self, x):
        return torch.tanh(x)

    def df(self, x):
        return 1.0 - torch.tanh(x) ** 2

    def d2f(self, x):
        t = torch.tanh(x)
        return -2.0 * t * (1.0 - t * t)
