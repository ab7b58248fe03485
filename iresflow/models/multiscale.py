"""The pieces of a residual flow's layout: stages of blocks, fully connected blocks on image
features, and the one place where the blocks and their residual functions are made.

A stage is a sequence of flow layers (ActNorm and contraction blocks), each with
``forward_and_logdet`` and ``inverse``. :class:`BlockMaker` turns the model's options into
layers: which block kind (``block``: ``residual``, ``implicit``, a plugin; one per scale or one
for all), which residual function (``residual``: ``mlp`` / ``dense_mlp`` for vectors, ``conv`` /
``dense_conv`` for images; ``fc_residual`` for the fully connected blocks at the end of an
image flow) and where the ActNorms go (``before`` or ``after`` each block, or ``none``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from iresflow.nn.block import InvertibleResidualBlock
from iresflow.nn.layers import ActNorm
from iresflow.nn.residual import ConvResidual, MLPResidual
from iresflow.registry import Factory, get, instance, missing_parameters

__all__ = ["Stage", "Flattened", "BlockMaker", "ACTNORM_PLACES", "actnorm_place"]

#: where ActNorm goes: before / after every block, ``input_and_after`` (one before a stage's first block
#: and one after every block: Residual Flows' train_toy.py), or none
ACTNORM_PLACES = ("before", "after", "input_and_after", "none")


def actnorm_place(actnorm: Any, is_image: bool) -> str:
    """``before`` / ``after`` / ``none`` from the option; ``true`` keeps each input kind's default
    (images: before each block, vectors: after it), ``false`` is ``none``."""
    if actnorm is True:
        return "before" if is_image else "after"
    if actnorm is False or actnorm is None:
        return "none"
    if actnorm in ACTNORM_PLACES:
        return actnorm
    raise ValueError(f"actnorm must be one of {', '.join(ACTNORM_PLACES)} (or true / false), not {actnorm!r}")


def _fresh(spec: Any) -> Any:
    """One block's own component (``None``: the block's default)."""
    return None if spec is None else instance(spec)


class Stage(nn.Module):
    """Flow layers applied in order; the log-dets add up."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer.forward_and_logdet(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class Flattened(nn.Module):
    """A flow layer on the flattened features ``[B, C*H*W]`` of image-shaped inputs (the fully
    connected blocks at the end of Residual Flows' image model). Flattening is a permutation-free
    reshape, so the log-det is the layer's own."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, logdet = self.layer.forward_and_logdet(x.flatten(1))
        return y.view(x.shape), logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_logdet(x)[0]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer.inverse(y.flatten(1)).view(y.shape)


class BlockMaker:
    """Makes the blocks of a flow from its options (see the module notes).

    ``settings``: what every residual function is offered (``activation``, ``coeff``,
    ``n_iterations``, ``preact``, ``normalization``); a residual node's own values win, and a
    function takes only the settings its signature names.
    """

    def __init__(self, *, block: Any, n_stages: int, residual: Any, fc_residual: Any, solver: Any, estimator: Any,
                 actnorm: str, settings: dict[str, Any]):
        kinds = list(block) if isinstance(block, (list, tuple)) else [block] * n_stages
        if len(kinds) != n_stages:
            raise ValueError(f"block lists {len(kinds)} block kinds; give one for every scale ({n_stages}) "
                             "or a single one for all")
        for kind in kinds:
            if isinstance(kind, nn.Module) or not (kind is None or callable(kind)):
                raise TypeError(f"block must be a block factory (a config node such as {{name: implicit}}), "
                                f"got {kind!r}")
        for name, spec in (("residual", residual), ("fc_residual", fc_residual)):
            if isinstance(spec, nn.Module) or not (spec is None or callable(spec)):
                raise TypeError(f"{name} must be a factory of residual functions (a config node such as "
                                f"{{name: dense_mlp}}), got {spec!r}")
        self.kinds, self.residual, self.fc_residual = kinds, residual, fc_residual
        self.solver, self.estimator, self.actnorm, self.settings = solver, estimator, actnorm, settings

    # -- residual functions ------------------------------------------------------------
    def _residual(self, spec: Any, default: type[nn.Module], what: str, **shape: Any) -> nn.Module:
        if spec is None:
            if default is MLPResidual:
                shape = {"dim": shape["dim"], "hidden": shape["hidden"]}
            else:
                shape = {k: shape[k] for k in ("in_channels", "input_size", "hidden_channels", "kernel_sizes")}
            return default(**shape, **self.settings)
        if isinstance(spec, Factory):  # a residual function for the other kind of input is bad input
            missing = missing_parameters(get(spec.kind, spec.name).obj, [*shape, *self.settings, *dict(spec.params)])
            if missing:
                raise ValueError(f"the residual function {spec!r} cannot be built for {what} (it needs "
                                 f"{', '.join(missing)}); vectors and fully connected blocks take mlp or "
                                 "dense_mlp, conv stages conv or dense_conv")
        return spec(**shape, **self.settings)

    def vector_residual(self, spec: Any, dim: int, hidden: Sequence[int]) -> nn.Module:
        return self._residual(spec, MLPResidual, f"{dim}-d vectors", dim=dim, hidden=list(hidden))

    def conv_residual(self, channels: int, size: tuple[int, int], hidden: int, kernel_sizes: Sequence[int]):
        return self._residual(self.residual, ConvResidual, f"{channels}x{size[0]}x{size[1]} images",
                              in_channels=channels, input_size=size, hidden_channels=hidden,
                              kernel_sizes=list(kernel_sizes))

    # -- blocks ------------------------------------------------------------------------
    def block(self, stage: int, g: nn.Module) -> nn.Module:
        """A block of ``stage``'s kind around ``g`` with its own solver and estimator."""
        kind = self.kinds[stage]
        solver, estimator = _fresh(self.solver), _fresh(self.estimator)
        if kind is None:
            return InvertibleResidualBlock(g, solver=solver, estimator=estimator)
        return kind(g=g, solver=solver, estimator=estimator)

    def with_actnorm(self, block: nn.Module, features: int, flatten: bool = False) -> list[nn.Module]:
        """The block with its ActNorm before or after it (none: the block alone)."""
        if self.actnorm == "none":
            return [block]
        norm = ActNorm(features)
        if flatten:
            norm = Flattened(norm)
        return [norm, block] if self.actnorm == "before" else [block, norm]

    def stage_input(self, features: int, flatten: bool = False) -> list[nn.Module]:
        """``input_and_after``: the ActNorm in front of a stage's first block (else nothing)."""
        if self.actnorm != "input_and_after":
            return []
        return [Flattened(ActNorm(features)) if flatten else ActNorm(features)]

    def vector_stage(self, stage: int, n_blocks: int, dim: int, hidden: Sequence[int]) -> list[nn.Module]:
        layers: list[nn.Module] = self.stage_input(dim)
        for _ in range(n_blocks):
            layers += self.with_actnorm(self.block(stage, self.vector_residual(self.residual, dim, hidden)), dim)
        return layers

    def conv_stage(self, stage: int, n_blocks: int, shape: tuple[int, int, int], hidden: int,
                   kernel_sizes: Sequence[int]) -> list[nn.Module]:
        c, h, w = shape
        layers: list[nn.Module] = self.stage_input(c)
        for _ in range(n_blocks):
            layers += self.with_actnorm(self.block(stage, self.conv_residual(c, (h, w), hidden, kernel_sizes)), c)
        return layers

    def fc_stage(self, stage: int, n_blocks: int, shape: tuple[int, int, int], hidden: Sequence[int]):
        """Fully connected blocks on the flattened ``shape`` (``fc_residual``, default an MLP)."""
        dim = math.prod(shape)
        layers: list[nn.Module] = self.stage_input(dim, flatten=True)
        for _ in range(n_blocks):
            block = Flattened(self.block(stage, self.vector_residual(self.fc_residual, dim, hidden)))
            layers += self.with_actnorm(block, dim, flatten=True)
        return layers
