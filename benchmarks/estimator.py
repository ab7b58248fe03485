"""Benchmark 5 -- log-det estimator quality per cost (cf. i-ResNet paper, Fig. 4).

A small residual function g (MLP 8-8-8-8, ELU, orthogonal maps: certified
Lip(g) <= 0.9 and really close to it, see ``benchmarks.inverse.make_g``; float64) where the exact log-det
(full Jacobian by ``torch.func.jacrev`` + ``vmap``, then ``slogdet``; computed
here, independently of iresflow's estimators) is cheap. For every cost level
the estimate is drawn many times (fresh Hutchinson probes, fresh N) at fixed
points x, and we report

- bias  = mean over draws and points of (estimate - exact), the estimate
          taken with *exact traces* (probes sqrt(d) e_i), so the series'
          own error is seen without Hutchinson noise burying it,
- std   = standard deviation over draws of the estimate with one Gaussian
          probe (the training configuration), averaged over points,
- cost  = mean number of vector-Jacobian products (series terms) per estimate,

for the truncated series (n = 1..20 terms: bias ~ Lip^n, small variance) and
Russian roulette (geometric p = 0.5, n_terms = 0..10: unbiased, the
variance paying for it). No target: this is the curve a user reads to pick n.

Second part (:func:`trace_variances`): the variance of the log-det estimate per trace
estimator (kind ``trace``) at the same number of vector-Jacobian products, on a
Jacobian with a flat spectrum (the orthogonal g) and one with a decaying spectrum.
"""

from __future__ import annotations

import math
import os

import torch

from benchmarks.common import Context, jsonable

TITLE = "Estimator quality per cost: bias and std vs exact log-det"


def exact_logdet(g, x: torch.Tensor) -> torch.Tensor:
    """log|det(I + J_g(x))| per sample, from the full Jacobian."""
    from torch.func import jacrev, vmap

    def single(xi):
        return g(xi.unsqueeze(0)).squeeze(0)

    with torch.no_grad():
        jac = vmap(jacrev(single))(x)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return torch.linalg.slogdet(eye + jac).logabsdet


def run(ctx: Context) -> dict:
    from iresflow.nn.logdet import PowerSeriesLogDet, RussianRouletteLogDet

    from benchmarks.inverse import contraction_rate, make_g

    c, dim = 0.9, 8
    if ctx.quick:
        ns, ks, draws, points = (1, 2, 4), (0, 2), 8, 8
    else:
        ns, ks, draws, points = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20), (0, 1, 2, 3, 4, 6, 8, 10), 200, 32
    g = make_g(c, dim, ctx.device, ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    x = (1.5 * torch.randn(points, dim, generator=gen, dtype=torch.float64)).to(ctx.device)
    exact = exact_logdet(g, x)
    torch.manual_seed(ctx.seed)

    # Exact traces (probes sqrt(d) e_i: their mean of v^T A v is tr A) isolate the
    # series' own error -> bias; one Gaussian probe, as in training -> std.
    basis = (math.sqrt(dim) * torch.eye(dim, dtype=x.dtype, device=x.device))[:, None, :].expand(dim, points, dim)
    rows = {"truncated": [], "russian_roulette": []}
    with torch.no_grad():
        xr = x.repeat(draws, 1)  # truncated: n fixed, so all Gaussian draws go in one call
        for n in ns:
            est = PowerSeriesLogDet(n_terms=n).train()
            _, exact_trace = est(g, x, probes=basis)
            _, ld = est(g, xr)
            rows["truncated"].append(_stats(exact_trace.unsqueeze(0), ld.view(draws, points), exact,
                                            cost=float(n), label=f"n={n}"))
        for k in ks:  # Russian roulette: N is drawn once per call, so one call per draw
            est = RussianRouletteLogDet(distribution="geometric", p=0.5, n_terms=k).train()
            exact_tr, lds, terms = [], [], []
            for _ in range(draws):
                exact_tr.append(est(g, x, probes=basis)[1])
                terms.append(est.last_n_terms)
                lds.append(est(g, x)[1])
                terms.append(est.last_n_terms)
            rows["russian_roulette"].append(
                _stats(torch.stack(exact_tr), torch.stack(lds), exact, cost=sum(terms) / len(terms),
                       label=f"exact={k}"))
    for name, rs in rows.items():
        for r in rs:
            ctx.log(f"estimator: {name:16s} {r['label']:9s} cost {r['cost']:5.2f}  "
                    f"bias {r['bias']:+.2e}  std {r['std']:.2e}  rmse {r['rmse']:.2e}")

    traces = trace_variances(ctx)
    res = {"settings": {"dim": dim, "hidden": [dim, dim], "activation": "elu", "weights": "orthogonal",
                        "lipschitz_certified": c, "dtype": "float64", "points": points,
                        "draws": draws, "trace": {"name": "hutchinson", "n_probes": 1, "probe": "gaussian"},
                        "geom_p": 0.5},
           "empirical_contraction_rate": contraction_rate(g, x + g(x)),
           "exact_logdet_mean": exact.mean().item(), "exact_logdet_std": exact.std().item(),
           "series": rows, "trace_estimators": traces, "targets": []}
    res["table"] = []
    for name, rs in rows.items():
        for r in rs:
            if name == "truncated" and r["cost"] not in (2, 5, 10, 20) and not ctx.quick:
                continue
            if name == "russian_roulette" and r["label"] not in ("exact=0", "exact=2", "exact=4", "exact=8") \
                    and not ctx.quick:
                continue
            res["table"].append({"metric": f"{name} {r['label']} (cost {r['cost']:.1f} vjp): |bias| / std",
                                 "iresflow": f"{r['abs_bias_per_point']:.1e} / {r['std']:.1e}"})
    for spectrum, entries in traces["rows"].items():
        for r in entries:
            res["table"].append({"metric": f"trace {r['label']}, {spectrum} spectrum ({r['cost']} vjp): "
                                           "variance of the log-det",
                                 "iresflow": f"{r['variance']:.2e}", "ratio": r["variance_vs_hutchinson"],
                                 "ratio_meaning": "variance / Hutchinson's (Gaussian)"})
    res["plots"] = [_plot(ctx, rows)]
    return jsonable(res)


def decaying_g(dim: int, device, seed: int, decay: float = 0.6):
    """MLP dim-dim-dim-dim with ELU whose three maps have singular values ``s * decay^i`` (top
    one at the per-map bound): a Jacobian with a decaying spectrum, where a low-rank sketch
    holds most of each trace."""
    from iresflow.nn.lipschitz import LIPSCHITZ_LAYERS, update_lipschitz
    from iresflow.nn.residual import MLPResidual
    from iresflow.registry import factory

    c = 0.9 ** (1.0 / 3.0)
    torch.manual_seed(seed)
    g = MLPResidual(dim, hidden=(dim, dim), activation=factory("activation", "elu"), coeff=c, n_iterations=1,
                    preact=False)
    gen = torch.Generator().manual_seed(seed)
    sv = c * decay ** torch.arange(dim, dtype=torch.float64)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, LIPSCHITZ_LAYERS):
                q1, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
                q2, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
                m.weight.copy_((q1 * sv) @ q2.t())
    g = g.to(device=device, dtype=torch.float64)
    update_lipschitz(g, n_iterations=200)
    return g.eval()


def trace_variances(ctx: Context) -> dict:
    """Variance of the log-det estimate (truncated series, n terms) per trace estimator, all
    at the same number of vector-Jacobian products: Hutchinson with P probes (Gaussian,
    Rademacher), Hutch++ with a rank-r sketch (r products) and m deflated probes
    (r + n (r + m) = n P), and the exact trace (d = P probes: no variance)."""
    from iresflow.nn.logdet import ExactTrace, Hutchinson, HutchPlusPlus, PowerSeriesLogDet

    from benchmarks.inverse import make_g

    dim, n = 16, 8
    budget = dim  # vectors per term: the exact trace's d
    rank, m = dim // 2, dim // 2 - 1  # r + n (r + m) = 8 + 8 * 15 = 128 = n * budget
    points, draws = (4, 40) if ctx.quick else (16, 400)
    estimators = {  # the first is the reference of the variance ratios
        f"hutchinson (Gaussian, {budget} probes)": Hutchinson(n_probes=budget),
        f"hutchinson (Rademacher, {budget} probes)": Hutchinson(n_probes=budget, probe="rademacher"),
        f"hutchpp (rank {rank}, {m} probes)": HutchPlusPlus(rank=rank, n_probes=m),
        "exact": ExactTrace(),
        # a small budget: 4 vectors per term (Hutch++: 2 + 3 per term, slightly cheaper)
        "hutchinson (Gaussian, 4 probes)": Hutchinson(n_probes=4),
        "hutchpp (rank 2, 1 probe)": HutchPlusPlus(rank=2, n_probes=1),
    }
    gs = {"flat (orthogonal maps)": make_g(0.9, dim, ctx.device, ctx.seed),
          "decaying": decaying_g(dim, ctx.device, ctx.seed)}
    gen = torch.Generator().manual_seed(ctx.seed + 2)
    x = (1.5 * torch.randn(points, dim, generator=gen, dtype=torch.float64)).to(ctx.device)
    xr = x.repeat(draws, 1)  # every row draws its own probes: draws x points independent estimates
    out = {"dim": dim, "n_terms": n, "vectors_per_term": budget, "points": points, "draws": draws, "rows": {}}
    torch.manual_seed(ctx.seed)
    for spectrum, g in gs.items():
        entries = []
        for label, trace in estimators.items():
            with torch.no_grad():
                _, ld = PowerSeriesLogDet(n_terms=n, trace=trace)(g, xr)
            var = ld.view(draws, points).var(0).mean().item()
            cost = trace.n_sketch(x) + n * trace.n_vectors(x)
            entries.append({"label": label, "cost": cost, "variance": var})
        base = entries[0]["variance"]
        for e in entries:
            e["variance_vs_hutchinson"] = e["variance"] / base if base > 0 else None
            ctx.log(f"estimator: trace {e['label']:36s} {spectrum:22s} cost {e['cost']:3d} vjp  "
                    f"variance {e['variance']:.2e} ({e['variance_vs_hutchinson']:.3f} of Hutchinson's)")
        out["rows"][spectrum] = entries
    return out


def _stats(exact_trace: torch.Tensor, hutchinson: torch.Tensor, exact: torch.Tensor, cost: float,
           label: str) -> dict:
    """``exact_trace``: [draws, points] estimates with exact traces (series error only);
    ``hutchinson``: [draws, points] estimates with one Gaussian probe (as in training)."""
    err = exact_trace - exact.unsqueeze(0)
    herr = hutchinson - exact.unsqueeze(0)
    n = err.numel()
    return {"label": label, "cost": cost, "bias": err.mean().item(),
            "abs_bias_per_point": err.mean(0).abs().mean().item(),
            "stderr_bias": (err.std() / math.sqrt(n)).item() if err.shape[0] > 1 else 0.0,
            "std_series_only": err.std(0).mean().item() if err.shape[0] > 1 else 0.0,
            "std": hutchinson.std(0).mean().item(), "rmse": herr.pow(2).mean().sqrt().item(),
            "bias_hutchinson": herr.mean().item()}


def _plot(ctx, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, rs in rows.items():
        cost = [r["cost"] for r in rs]
        axes[0].semilogy(cost, [max(r["abs_bias_per_point"], 1e-16) for r in rs], marker="o", label=name)
        axes[0].fill_between(cost, 1e-16, [max(2 * r["stderr_bias"], 1e-16) for r in rs], alpha=0.15)
        axes[1].semilogy(cost, [r["std"] for r in rs], marker="o", label=name)
    axes[0].set_title("mean |bias| per point, exact traces (shaded: 2 s.e.)")
    axes[1].set_title("std of one estimate (1 Gaussian probe)")
    for ax in axes:
        ax.set_xlabel("mean vector-Jacobian products per estimate")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=1e-8)
    fig.suptitle("Log-det estimators vs exact (MLP g, Lip <= 0.9, dim 8)")
    fig.tight_layout()
    path = os.path.join(ctx.out_dir, "estimator_quality.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
