"""Fig. 4 of the i-ResNet paper: bias and standard deviation of the log-det estimators vs terms.

A residual flow trained on the digits as 64-d vectors (float64 here), where the exact log-det of
every block is cheap. For each number of terms ``n``, every block's estimator is replaced by the
truncated power series with ``n`` terms (i-ResNet: biased) or by the Russian roulette with ``n``
exact terms and the random tail (Residual Flows: unbiased), and the sum of the blocks' log-dets
of a fixed set of test images is estimated:

- bias = mean over images of (estimate - exact), the estimate taken with *exact traces* (the
  probes ``sqrt(d) e_i``, i = 1..d), so the series' own error is seen without Hutchinson noise
  burying it: one evaluation for the truncated series (deterministic), ``repeats`` for the
  roulette (random tail), with the standard error of their mean;
- std = the standard deviation of one estimate with one Gaussian probe per block (the training
  configuration) over ``repeats`` draws, averaged over the images;
- terms = the mean number of series terms computed per block (the roulette's cost beyond ``n``).

The power-iteration vectors are converged first (as before evaluation in the tasks), so the
certified bound holds and the series converge.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from iresflow.nn.lipschitz import update_lipschitz
from iresflow.nn.logdet import ExactLogDet, PowerSeriesLogDet, RussianRouletteLogDet
from iresflow.reproduce.common import Context, load_run

TITLE = "Fig. 4 - log-det estimators: bias and std vs number of terms"
QUESTION = ("How many series terms does the log-det need, and what does the Russian roulette buy? The "
            "i-ResNet paper's Fig. 4 (bias and std of the truncated estimator against the number of terms), "
            "with the unbiased Russian roulette of Residual Flows beside it, on a flow trained on the digits.")


def exact_trace_probes(x: torch.Tensor) -> torch.Tensor:
    """``[d, *x.shape]`` probes ``sqrt(d) e_i``: their Hutchinson average is the exact trace."""
    d = x[0].numel()
    basis = torch.eye(d, dtype=x.dtype, device=x.device) * math.sqrt(d)
    return basis.view(d, 1, *x.shape[1:]).expand(d, *x.shape).contiguous()


class _Recorded(nn.Module):
    """An estimator that keeps the log-dets it returns (one per block), optionally with exact traces."""

    def __init__(self, inner: nn.Module, store: list, exact_traces: bool):
        super().__init__()
        self.inner, self.store, self.exact_traces = inner, store, exact_traces

    def forward(self, g, x):
        if self.exact_traces:
            gx, logdet = self.inner(g, x, probes=exact_trace_probes(x))
        else:
            gx, logdet = self.inner(g, x)
        self.store.append(logdet.detach())
        return gx, logdet


@torch.no_grad()
def flow_logdets(flow, x: torch.Tensor, make, repeats: int, exact_traces: bool = False
                 ) -> tuple[torch.Tensor, float]:
    """``[repeats, images]`` estimates of the sum of the blocks' log-dets, and the mean terms per block."""
    out, terms = [], []
    for _ in range(repeats):
        store: list = []
        for block in flow.blocks:
            block.estimator = _Recorded(make().eval(), store, exact_traces)
        flow.forward_and_logdet(x)
        out.append(torch.stack(store).sum(0))
        terms += [b.estimator.inner.last_n_terms for b in flow.blocks]
    return torch.stack(out), sum(terms) / len(terms)


def bias_of(error: torch.Tensor) -> dict[str, float]:
    """Mean of ``error [repeats, images]`` and its standard error (0 for a single evaluation)."""
    per_repeat = error.mean(1)
    stderr = float(per_repeat.std() / math.sqrt(len(per_repeat))) if len(per_repeat) > 1 else 0.0
    return {"bias": float(error.mean()), "stderr": stderr}


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = [r["n"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    for key, label, colour in (("truncated", "truncated series (i-ResNet)", "C0"),
                               ("roulette", "Russian roulette (Residual Flows)", "C1")):
        bias = [abs(r[f"{key}_bias"]) for r in rows]
        a.plot(n, bias, "o-", color=colour, label=f"|bias|, {label}")
        if key == "roulette":
            a.plot(n, [2 * r[f"{key}_stderr"] for r in rows], ":", color=colour, label="2 standard errors (roulette)")
        b.plot(n, [r[f"{key}_std"] for r in rows], "o-", color=colour, label=label)
        c.plot(n, [r[f"{key}_terms"] for r in rows], "o-", color=colour, label=label)
    a.set_yscale("log")
    a.set_title("|bias| of the log-det, exact traces (nats per image)")
    b.set_title("std of one estimate (nats)")
    c.set_title("terms computed per block (mean)")
    for ax in (a, b, c):
        ax.set_xlabel("n (exact terms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: Context) -> dict:
    s = ctx.settings
    ctx.train("flow")
    flow, dm, _ = load_run(ctx.run_dir("flow"))
    flow = flow.double()
    update_lipschitz(flow, 200)
    dm.setup("test")
    x = torch.stack([dm.test_set[i][0] for i in range(int(s["images"]))]).double()
    exact, _ = flow_logdets(flow, x, ExactLogDet, 1)
    exact = exact[0]
    rows = []
    for n in s["terms"]:
        row: dict = {"n": int(n)}
        for key, make, draws in (("truncated", lambda n=n: PowerSeriesLogDet(n_terms=n), 1),
                                 ("roulette", lambda n=n: RussianRouletteLogDet(n_terms=n, eval_n_terms=n),
                                  int(s["repeats"]))):
            traced, terms = flow_logdets(flow, x, make, draws, exact_traces=True)
            row.update({f"{key}_{k}": v for k, v in bias_of(traced - exact).items()})
            probed, _ = flow_logdets(flow, x, make, int(s["repeats"]))
            row[f"{key}_std"] = float((probed - exact).std(0).mean())
            row[f"{key}_terms"] = terms
        rows.append(row)
        ctx.say(f"n={n}: truncated bias {row['truncated_bias']:+.3g}, roulette bias {row['roulette_bias']:+.3g} "
                f"(+-{row['roulette_stderr']:.2g}); std {row['truncated_std']:.3g} / {row['roulette_std']:.3g}")
    figure = ctx.out / "estimator.png"
    _plot(rows, figure)
    bounds = [b.lipschitz_bound() for b in flow.blocks]
    columns = [("n", "n"), ("truncated_bias", "truncated bias"), ("truncated_std", "truncated std"),
               ("roulette_bias", "roulette bias"), ("roulette_stderr", "+-"), ("roulette_std", "roulette std"),
               ("roulette_terms", "roulette terms")]
    return ctx.write(
        title=TITLE, question=QUESTION, figure=figure, rows=rows, columns=columns,
        notes=[f"{len(x)} test digits (64-d); the blocks' exact log-det: mean {float(exact.mean()):.3f} nats per "
               f"image; {len(flow.blocks)} blocks, certified Lip(g) up to {max(bounds):.3f}.",
               "bias: mean(estimate - exact) over the images with exact traces (the series' own error; the "
               f"roulette over {s['repeats']} draws of its tail, +- its standard error); std: the spread of one "
               f"estimate with one Gaussian probe per block ({s['repeats']} draws). The roulette draws its terms "
               "beyond n at random (geometric, p = 0.5): n + 1 terms on average. Its k-th term is reweighted by "
               "2^(k-n), so with Lip(g) near 1 the draws are heavy-tailed and the standard error is rough for small "
               "n (Residual Flows keep n >= 2 exact terms for this reason)."],
        extra={"exact_mean": float(exact.mean()), "lipschitz": bounds})
