"""LightningModules (registered kind ``"task"``): ``density``, ``classification`` and ``hybrid``; and the
optimisers (registered kind ``"optimizer"``: adam, adamw, adamax, sgd, rmsprop).

A task takes the built model plus training settings (``configs/task/*.yaml``):
optimiser and schedule, Lipschitz upkeep after every optimiser step, the
non-finite-loss policy, and its metrics and pictures.
"""

from iresflow.tasks import base, classification, density, hybrid, optimizers  # noqa: F401  (imports register them)
from iresflow.tasks.base import IResTask, LRSchedule, NonFiniteLossError
from iresflow.tasks.classification import ClassificationTask
from iresflow.tasks.density import DensityTask, bits_per_dim
from iresflow.tasks.hybrid import HybridTask

__all__ = [
    "IResTask",
    "LRSchedule",
    "NonFiniteLossError",
    "ClassificationTask",
    "DensityTask",
    "HybridTask",
    "bits_per_dim",
]
