"""Optimisers (registered kind ``"optimizer"``): torch's own, registered under short names.

A task receives its optimiser as a factory from the node ``task.optimizer``
(``{name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 5e-4}``) and calls it with the
parameters to train; every other key of the node is a keyword of the torch class
(an unknown one is refused, with the close match, when the config is built).
"""

from __future__ import annotations

import torch

from iresflow.registry import register

__all__ = ["OPTIMIZERS"]

#: registered name -> (torch.optim class, description)
OPTIMIZERS = {
    "adam": (torch.optim.Adam, "Adam (torch.optim.Adam): lr, betas, eps, weight_decay, amsgrad"),
    "adamw": (torch.optim.AdamW, "AdamW, decoupled weight decay (torch.optim.AdamW)"),
    "adamax": (torch.optim.Adamax, "Adamax, the infinity-norm Adam (torch.optim.Adamax)"),
    "sgd": (torch.optim.SGD, "SGD with momentum / Nesterov (torch.optim.SGD): lr, momentum, weight_decay"),
    "rmsprop": (torch.optim.RMSprop, "RMSprop (torch.optim.RMSprop): lr, alpha, momentum, weight_decay"),
}

for _name, (_cls, _description) in OPTIMIZERS.items():
    register("optimizer", _name, description=_description)(_cls)
