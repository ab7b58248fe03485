"""Density estimation by maximum likelihood (registered task ``"density"``).

The model is a flow with ``log_prob(x)`` (nats, standard-normal prior, every
layer's log-det included: the logit transform's too), ``forward_and_logdet``,
``inverse`` and ``sample``.

Units, so that numbers compare with the papers:

- vectors (toy 2D): ``nll`` = ``-log p(x)`` in nats per sample;
- images, ``x = (pixel + u) / 256`` in ``[0, 1)^D``: the density of the 8-bit
  data is ``p(x) / 256^D``, so
  ``bpd = -(log p(x) - D log 256) / (D ln 2) = -log p(x) / (D ln 2) + 8``
  (:func:`bits_per_dim`). The loss is the bpd for images, the nll for vectors.

Validation uses the model's estimator in eval mode (for Russian roulette: more
exact terms, still unbiased); the test may swap in ``eval_estimator`` (e.g. the
exact log-det in 2D). Every validation logs the reconstruction error
``|inverse(forward(x)) - x|`` of a batch and the solver's iterations /
convergence, and draws pictures (density next to data and samples in 2D;
sample grids and reconstructions for images).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn
from torchmetrics import MeanMetric

from iresflow.registry import register
from iresflow.tasks.base import IResTask, estimator_names

__all__ = ["DensityTask", "bits_per_dim"]


class _SavedEstimator(NamedTuple):
    block: nn.Module
    attribute: str
    estimator: Any


def _replace_estimators(blocks: Sequence[nn.Module], make) -> list[_SavedEstimator]:
    """Set every estimator attribute of every block to ``make()``; returns what was there."""
    saved = []
    for block in blocks:
        for name in estimator_names(block):
            saved.append(_SavedEstimator(block, name, getattr(block, name)))
            setattr(block, name, make())
    return saved


def _put_back_estimators(saved: list[_SavedEstimator]) -> None:
    for entry in saved:
        setattr(entry.block, entry.attribute, entry.estimator)


def bits_per_dim(log_prob: torch.Tensor, num_dims: int, n_bits: float | None = 8) -> torch.Tensor:
    """Bits/dim of ``2^n_bits``-level data from ``log p(x)`` (nats) of the density on ``[0, 1]^D``
    (``n_bits`` need not be an integer: ``log2(17)`` for the 17-level digits)."""
    offset = 0.0 if n_bits is None else n_bits * num_dims * math.log(2.0)
    return -(log_prob - offset) / (num_dims * math.log(2.0))


@register("task", "density", description="maximum likelihood: NLL (nats) / bits-per-dim, samples, "
                                         "reconstructions, inverse and log-det diagnostics")
class DensityTask(IResTask):
    """Train a flow by maximum likelihood.

    Besides the shared parameters (:class:`iresflow.tasks.base.IResTask`: optimizer, scheduler,
    milestones, gamma, warmup_steps, warmup_epochs, lipschitz_iterations,
    lipschitz_eval_iterations, on_nonfinite, max_consecutive_skips):
      dims: per-sample shape of the data (from the datamodule);
      data_kind: "vector" or "image"; n_bits: 8 for dequantised 8-bit images
        (bits/dim are reported), None for continuous data;
      eval_estimator: log-det estimator node used at test time (None: the
        model's own estimator in eval mode);
      n_samples: samples drawn for the pictures; picture_every_n_val: draw
        pictures at every n-th validation (0: only at the end of training);
      recon_batch_size: validation points sent through forward and inverse.
    """

    monitor = "val/nll"
    monitor_mode = "min"

    def __init__(self, model: nn.Module, *, dims: Sequence[int] = (2,), data_kind: str = "vector",
                 n_bits: float | None = None, eval_estimator: Any = None, n_samples: int = 2000,
                 picture_every_n_val: int = 1, recon_batch_size: int = 64, **common: Any):
        super().__init__(model, **common)
        if data_kind not in ("vector", "image"):
            raise ValueError(f"data_kind must be 'vector' or 'image', not {data_kind!r}")
        self.dims = tuple(int(d) for d in dims)
        self.num_dims = int(math.prod(self.dims))
        self.data_kind = data_kind
        self.n_bits = None if n_bits is None else float(n_bits)  # log2(levels): 8, or log2(17) for digits
        self.report_bpd = self.n_bits is not None  # discretised data (images, or flattened images)
        if self.report_bpd:
            self.monitor = "val/bpd"
        self.eval_estimator = eval_estimator
        self.n_samples = int(n_samples)
        self.picture_every_n_val = int(picture_every_n_val)
        self.recon_batch_size = int(recon_batch_size)
        # the factories stay out: the run config (in every checkpoint) holds their nodes
        self.save_hyperparameters(ignore=["model", "optimizer", "eval_estimator"])
        self._metrics = nn.ModuleDict({
            f"{stage}_{name}": MeanMetric() for stage in ("val", "test") for name in ("nll", "bpd", "recon")
        })
        self._n_val = 0
        self._saved_estimators: list[_SavedEstimator] | None = None

    # ------------------------------------------------------------------ core
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(x)

    def _bpd(self, logp: torch.Tensor) -> torch.Tensor:
        return bits_per_dim(logp, self.num_dims, self.n_bits)

    def training_step(self, batch, batch_idx: int):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        nll, bpd = self.density_terms(self.log_prob(x))
        loss = bpd if bpd is not None else nll
        if not self.check_loss(loss, batch_idx):
            return None
        self.log_training(loss, nll, bpd)
        return loss

    def density_terms(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's mean NLL (nats) and, for discretised data, mean bits/dim (else None)."""
        return -logp.mean(), (self._bpd(logp).mean() if self.report_bpd else None)

    def log_training(self, loss: torch.Tensor, nll: torch.Tensor, bpd: torch.Tensor | None) -> None:
        """The training step's loss, NLL, bits/dim and (every ``log_every_n_steps``) block diagnostics."""
        # sync_dist: under DDP the logged value is the mean over the ranks (the global batch)
        self.log("train/loss", loss.detach(), prog_bar=False, sync_dist=True)
        self.log("train/nll", nll.detach(), prog_bar=not self.report_bpd, sync_dist=True)
        if bpd is not None:
            self.log("train/bpd", bpd.detach(), prog_bar=True, sync_dist=True)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            diag = self.block_diagnostics()
            for key in ("estimator_terms", "lipschitz_max"):
                if key in diag:
                    self.log(f"train/{key}", float(diag[key]), sync_dist=True)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, batch, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.log_evaluation(stage, x, self.log_prob(x).detach(), batch_idx)

    def log_evaluation(self, stage: str, x: torch.Tensor, logp: torch.Tensor, batch_idx: int) -> None:
        """NLL and bits/dim of an evaluation batch; on the first batch the reconstruction error of
        ``inverse(forward(x))`` and the block diagnostics."""
        self._metrics[f"{stage}_nll"].update(-logp)
        self.log(f"{stage}/nll", self._metrics[f"{stage}_nll"], prog_bar=stage == "val" and not self.report_bpd)
        if self.report_bpd:
            self._metrics[f"{stage}_bpd"].update(self._bpd(logp))
            self.log(f"{stage}/bpd", self._metrics[f"{stage}_bpd"], prog_bar=stage == "val")
        if batch_idx == 0:
            err = self.reconstruction_error(x[: self.recon_batch_size])
            self._metrics[f"{stage}_recon"].update(err)
            self.log(f"{stage}/recon_error", self._metrics[f"{stage}_recon"])
            for key, value in self.block_diagnostics().items():
                self.log(f"{stage}/{key}", float(value), sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Largest per-sample RMS of ``inverse(forward(x)) - x`` (also stores solver info)."""
        self.reset_solve_info()
        z = self._forward(x)
        x_rec = self.model.inverse(z)
        diff = (x_rec.reshape(x.shape) - x).flatten(1)
        return diff.pow(2).mean(1).sqrt().max()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        forward = getattr(self.model, "forward_and_logdet", None)
        if forward is None:
            return self.model(x)
        z, _ = forward(x)  # estimators compute values without graphs when grad is off
        return z.detach()

    # ------------------------------------------------------------------ test-time estimator
    def _swap_estimators(self, node: Any) -> None:
        """Every estimator of every block (an implicit block has two) replaced by a fresh one from ``node``."""
        from iresflow.registry import instance

        def fresh():
            est = instance(node)
            if isinstance(est, nn.Module):
                est = est.to(self.device)
                est.eval()
            return est

        self._saved_estimators = _replace_estimators(self.blocks(), fresh)

    def _restore_estimators(self) -> None:
        if self._saved_estimators is None:
            return
        _put_back_estimators(self._saved_estimators)
        self._saved_estimators = None

    @contextlib.contextmanager
    def evaluation_estimator(self):
        """Use ``eval_estimator`` (when set) in every block inside the ``with``."""
        if self.eval_estimator is None:
            yield
            return
        self._swap_estimators(self.eval_estimator)
        try:
            yield
        finally:
            self._restore_estimators()

    def on_test_start(self) -> None:
        super().on_test_start()
        if self.eval_estimator is not None:
            self._swap_estimators(self.eval_estimator)

    def on_test_end(self) -> None:
        self._restore_estimators()
        super().on_test_end()  # the training's random generators back

    # ------------------------------------------------------------------ pictures
    def on_validation_epoch_end(self) -> None:
        self._n_val += 1
        if self.trainer.sanity_checking or not self.picture_every_n_val:
            return
        if self._n_val % self.picture_every_n_val == 0 and self.trainer.is_global_zero:
            self.make_pictures(tag=f"step{self.global_step:07d}", folder=self.output_dir / "pictures")

    def on_fit_end(self) -> None:
        # The final pictures are an evaluation: converged copies of the vectors and their own random
        # numbers, so the final checkpoint (written after this) still resumes a longer run exactly.
        # Every rank converges (the vectors stay identical across ranks); only rank 0 draws.
        with self.evaluating():
            if self.trainer.is_global_zero:
                was_training = self.training
                self.eval()
                try:
                    self.make_pictures(tag="final", folder=self.output_dir)
                finally:
                    self.train(was_training)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` samples through the inverse (stores the solver info for diagnostics).

        A model whose ``sample`` takes no ``temperature`` samples at temperature 1 only.
        """
        self.reset_solve_info()
        if "temperature" in inspect.signature(self.model.sample).parameters:
            return self.model.sample(n, temperature=temperature)
        if temperature != 1.0:
            raise ValueError(f"{type(self.model).__name__}.sample() takes no temperature; "
                             f"sample at temperature=1, not {temperature}")
        return self.model.sample(n)

    def make_pictures(self, tag: str, folder: Path) -> list[Path]:
        """Write (and log) the pictures of the current model; returns their paths."""
        from iresflow import plotting

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        try:
            if self.data_kind == "vector" and self.num_dims == 2:
                data = self._reference_points(datamodule, self.n_samples)
                samples = self.sample(self.n_samples).float().cpu()
                with self.evaluation_estimator():
                    path = plotting.density_2d(self._log_prob_batched, data, samples,
                                               folder / f"density_{tag}.png" if tag != "final"
                                               else folder / "density.png", device=self.device)
                paths.append(path)
                self.log_picture("pictures/density", path)
            elif self.data_kind == "image":
                samples = self.sample(min(self.n_samples, 64)).float().cpu()
                path = plotting.image_grid(samples.reshape(-1, *self.dims),
                                           folder / (f"samples_{tag}.png" if tag != "final" else "samples.png"))
                paths.append(path)
                self.log_picture("pictures/samples", path)
                x = self._reference_points(datamodule, 32)
                if x is not None:
                    x = x.to(self.device)
                    x_rec = self.model.inverse(self._forward(x)).reshape(x.shape)
                    path = plotting.reconstructions(x.cpu(), x_rec.cpu(), folder / (
                        f"reconstructions_{tag}.png" if tag != "final" else "reconstructions.png"))
                    paths.append(path)
                    self.log_picture("pictures/reconstructions", path)
        except Exception as err:  # a failed picture is reported, never a failed run
            self.print(f"warning: could not draw the pictures ({type(err).__name__}: {err})")
        return paths

    def _log_prob_batched(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        with self._exact_log_det_if_small():
            out = [self.log_prob(x[i:i + chunk].to(self.device)).detach().cpu() for i in range(0, len(x), chunk)]
        return torch.cat(out)

    @contextlib.contextmanager
    def _exact_log_det_if_small(self, max_dims: int = 16):
        """The density picture of small vectors uses the exact log-det. The heat map is
        ``exp(log p)``: with one Hutchinson probe per grid point, the stochastic
        estimate's noise turns into a few bright speckles instead of the density."""
        from iresflow.nn.logdet import ExactLogDet

        blocks = [b for b in self.blocks() if estimator_names(b)]
        if self.data_kind != "vector" or math.prod(self.dims) > max_dims or not blocks:
            yield
            return
        saved = _replace_estimators(blocks, lambda: ExactLogDet().to(self.device).eval())
        try:
            yield
        finally:
            _put_back_estimators(saved)

    def _reference_points(self, datamodule, n: int) -> torch.Tensor | None:
        """Points of the data: the toy sampler if there is one, else validation batches."""
        if datamodule is None:
            return None
        if hasattr(datamodule, "sample"):
            g = torch.Generator().manual_seed(1234)
            return datamodule.sample(n, g)
        try:
            loader = datamodule.val_dataloader()
        except Exception:
            return None
        xs, have = [], 0
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            xs.append(x)
            have += len(x)
            if have >= n:
                break
        return torch.cat(xs)[:n] if xs else None
