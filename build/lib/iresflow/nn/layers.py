"""Flow layers of a multi-scale residual flow (besides the residual blocks).

Bijective layers expose ``forward_and_logdet(x) -> (y, logdet[B])``,
``inverse(y) -> x`` and ``forward(x) -> y``. ``InjectivePad`` shares the
interface but is not a bijection; ``Split`` is a shape-only helper with
``split``/``merge``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ActNorm", "Squeeze", "InjectivePad", "LogitTransform", "Split"]


def _zero_logdet(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(x.shape[0])


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + b) * exp(s)``; ``log|det J| = sum(s) * H * W``.

    Inputs are ``[B, C]`` or ``[B, C, *spatial]``. On the first training forward,
    ``b = -mean`` and ``s = -log(std + 1e-6)`` per channel (Kingma & Dhariwal,
    Glow), so that batch's output is zero-mean and unit-variance. Under
    ``torch.distributed`` the statistics are those of the global batch.
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.logscale = nn.Parameter(torch.zeros(num_features))
        # A buffer, not a Python bool: it is saved in checkpoints, so a loaded
        # model keeps its parameters instead of re-initialising on new data.
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ActNorm({self.num_features}) expects [B, {self.num_features}, ...], got {tuple(x.shape)}"
            )

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        # Accumulate in float64: E[x^2] - mean^2 cancels badly in float32.
        xd = x.detach().double()
        count = xd.numel() / self.num_features
        stats = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([count])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Sums (not per-rank means) so unequal local batches weigh correctly
            # and every rank ends with the parameters of the global batch.
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        c = self.num_features
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        self.bias.copy_(-mean)
        self.logscale.copy_(-torch.log(var.sqrt() + self.eps))
        self.initialized.fill_(True)

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        # Eval-mode calls before init just use the current (identity) parameters.
        if self.training and not self._seen_initialized:
            # Read the buffer (a device sync) only until it is known to be set.
            if not bool(self.initialized):
                self._initialize(x)
            self._seen_initialized = True
        y = (x + self._view(self.bias, x)) * torch.exp(self._view(self.logscale, x))
        logdet = (self.logscale.sum() * math.prod(x.shape[2:])).to(x.dtype).expand(x.shape[0])
        return y, logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_logdet(x)[0]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            raise RuntimeError(
                "ActNorm.inverse called before data-dependent initialisation; "
                "run a training-mode forward (or load a checkpoint) first"
            )
        self._check(y)
        return y * torch.exp(-self._view(self.logscale, y)) - self._view(self.bias, y)


class Squeeze(nn.Module):
    """Space-to-depth ``[B, C, H, W] -> [B, C f^2, H/f, W/f]``; a permutation, so ``log|det| = 0``.

    Channel ``c f^2 + i f + j`` of the output holds pixel ``(f h + i, f w + j)``
    of input channel ``c`` (the ``pixel_unshuffle`` layout).
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        if factor < 1:
            raise ValueError(f"Squeeze factor must be >= 1, got {factor}")
        self.factor = factor

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.factor
        if x.dim() != 4:
            raise ValueError(f"Squeeze expects [B, C, H, W], got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"Squeeze({f}): H and W must be divisible by {f}, got {tuple(x.shape[2:])}")
        return F.pixel_unshuffle(x, f), _zero_logdet(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_logdet(x)[0]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        f = self.factor
        if y.dim() != 4 or y.shape[1] % (f * f):
            raise ValueError(f"Squeeze({f}).inverse expects [B, C*{f * f}, H, W], got {tuple(y.shape)}")
        return F.pixel_shuffle(y, f)


class InjectivePad(nn.Module):
    """``x -> [x, 0]``: append ``pad_channels`` zero channels along dim 1 (i-ResNet classifier).

    Injective, not bijective: there is no density change to speak of, and the
    returned ``logdet`` of 0 is only a placeholder. Use it in classifiers, not flows.
    """

    def __init__(self, pad_channels: int):
        super().__init__()
        if pad_channels < 0:
            raise ValueError(f"pad_channels must be >= 0, got {pad_channels}")
        self.pad_channels = pad_channels

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 2:
            raise ValueError(f"InjectivePad expects [B, C, ...], got {tuple(x.shape)}")
        zeros = x.new_zeros(x.shape[0], self.pad_channels, *x.shape[2:])
        return torch.cat([x, zeros], dim=1), _zero_logdet(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_logdet(x)[0]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Left inverse: drop the padded channels (whatever they hold)."""
        return y[:, : y.shape[1] - self.pad_channels]


class LogitTransform(nn.Module):
    """``s = a + (1 - 2a) x``, ``y = log s - log(1 - s)`` for dequantised ``x`` in [0, 1].

    ``log|det J| = sum_i [log(1 - 2a) - log s_i - log(1 - s_i)]`` per sample; the
    ``a`` margin keeps ``y`` finite at ``x = 0`` and ``x = 1`` (RealNVP).
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward_and_logdet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha
        s = a + (1.0 - 2.0 * a) * x
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        y = log_s - log_1ms
        logdet = (math.log1p(-2.0 * a) - log_s - log_1ms).flatten(1).sum(1)
        return y, logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_and_logdet(x)[0]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)


class Split(nn.Module):
    """Multi-scale factor-out (Dinh et al., RealNVP): ``x -> (x[:, :C/2], x[:, C/2:])``.

    The model keeps transforming ``kept`` and sends ``out`` straight to the
    prior. A coordinate split, so it adds nothing to the log-det.
    ``forward`` is ``split`` and ``inverse`` is ``merge``.
    """

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 2 or x.shape[1] % 2:
            raise ValueError(f"Split needs an even number of channels in [B, C, ...], got {tuple(x.shape)}")
        half = x.shape[1] // 2
        return x[:, :half], x[:, half:]

    def merge(self, kept: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if kept.shape != out.shape:
            raise ValueError(f"Split.merge needs equal shapes, got {tuple(kept.shape)} and {tuple(out.shape)}")
        return torch.cat([kept, out], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(x)

    def inverse(self, kept: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.merge(kept, out)
