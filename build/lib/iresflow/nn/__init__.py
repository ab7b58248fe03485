"""The components of invertible residual networks, one mathematical object per module.

Importing this package registers the built-ins: activations, residual
functions, inverse solvers, log-det estimators and trace estimators.
"""

from iresflow.nn import activations, block, layers, lipschitz, logdet, residual, solvers  # noqa: F401
from iresflow.nn import broyden, dense, implicit  # noqa: F401
from iresflow.nn.block import InvertibleResidualBlock
from iresflow.nn.layers import ActNorm, InjectivePad, LogitTransform, Split, Squeeze
from iresflow.nn.lipschitz import LipschitzConv2d, LipschitzLinear, keep_up_lipschitz, update_lipschitz
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.nn.solvers import SolveInfo

__all__ = [
    "ActNorm", "ConvResidual", "InjectivePad", "InvertibleResidualBlock", "LipschitzConv2d",
    "LipschitzLinear", "LogitTransform", "MLPResidual", "SolveInfo", "Split", "Squeeze",
    "keep_up_lipschitz",
    "update_lipschitz",
]
