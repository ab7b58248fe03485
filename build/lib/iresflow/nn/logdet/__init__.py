"""Log-determinant estimators for invertible residual blocks, ``log|det(I + J_g(x))|``.

Read top-down:

* :mod:`.estimators` -- the estimators (``exact``, ``power_series``, ``russian_roulette``)
  and the gradient modes (``backprop``, ``neumann``, ``memory_efficient``);
* :mod:`.series` -- the series and the Neumann surrogate, as their formulas;
* :mod:`.trace` -- the trace estimators (kind ``trace``: ``hutchinson``, ``exact``, ``hutchpp``);
* :mod:`.products` -- the Jacobian-product backends (autograd, layer chain, dense);
* :mod:`.chain` -- a residual function as a chain of linear maps and activations;
* :mod:`.fused` -- the memory-efficient gradient by hand for such chains;
* :mod:`.backward_in_forward` -- the memory-efficient gradient by autograd for any ``g``.
"""

from iresflow.nn.logdet.estimators import (GRADIENT_MODES, ExactLogDet, LogDetEstimator, PowerSeriesLogDet,
                                           RussianRouletteLogDet)
from iresflow.nn.logdet.trace import ExactTrace, Hutchinson, HutchPlusPlus, Probes, TraceEstimator, sample_probes

__all__ = ["LogDetEstimator", "ExactLogDet", "PowerSeriesLogDet", "RussianRouletteLogDet", "GRADIENT_MODES",
           "TraceEstimator", "Hutchinson", "ExactTrace", "HutchPlusPlus", "Probes", "sample_probes"]
