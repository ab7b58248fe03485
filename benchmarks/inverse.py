"""Benchmark 4 -- inverting a block: fixed point vs Anderson acceleration.

Two kinds of residual function g, each solved to tolerance 1e-6 (RMS residual
per sample, worst sample) in float64, for c in (0.5, 0.9, 0.97):

- **trained** (the targets): a toy flow (10 blocks of 2-64-64-2 LipSwish,
  ActNorm) trained for 400 steps on 8 Gaussians at bound c; every block is
  inverted at its own inputs from 512 data points -- what sampling from a
  trained model costs. Totals over the 10 blocks.
- **orthogonal** (information, the worst case): an MLP 32-32-32-32 with ELU
  whose 3 maps are orthogonal and normalised to c^(1/3) (``make_g``): it
  contracts near c but the eigenvalues of J_g spread around a circle, where
  no Krylov-type acceleration (Anderson is one) can beat the plain rate.

Reported: evaluations of g (calls, counted by a wrapper, independently of the
solver's own count) and evaluations per sample (the solvers stop evaluating a
sample once it has converged: the work), wall time (median of repeats), the
error against the true x, and for the orthogonal g the empirical contraction
rate and spectrum.

Target: at c = 0.9, Anderson uses <= 1/3 of fixed point's evaluations of g,
and less wall time.
"""

from __future__ import annotations

import math
import os

import torch

from benchmarks.common import Context, jsonable, median, target, timed

TITLE = "Inverse: fixed point vs Anderson (tol 1e-6, float64)"
COEFFS = (0.5, 0.9, 0.97)


def make_g(c: float, dim: int, device, seed: int = 0, n_maps: int = 3, activation: str = "elu"):
    """MLP residual dim-dim-...-dim whose certified Lipschitz bound is c, and which
    really contracts close to it.

    Each of the ``n_maps`` square maps is orthogonal times 10 before
    normalisation, so after it *every* singular value equals the per-map
    coefficient c^(1/n_maps) (the bound is attained in all directions, not just
    one); ELU has slope 1 on half the line. A randomly initialised LipSwish MLP
    contracts at ~0.35 whatever its bound, which would make every solver look
    fast: this g is the hard, trained-network-like case.
    """
    from iresflow.nn.lipschitz import LIPSCHITZ_LAYERS, update_lipschitz
    from iresflow.nn.residual import MLPResidual
    from iresflow.registry import factory

    torch.manual_seed(seed)
    g = MLPResidual(dim, hidden=(dim,) * (n_maps - 1), activation=factory("activation", activation),
                    coeff=c ** (1.0 / n_maps), n_iterations=1, preact=False)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, LIPSCHITZ_LAYERS):
                torch.nn.init.orthogonal_(m.weight)
                m.weight.mul_(10.0)  # above the bound -> normalised onto it
    g = g.to(device=device, dtype=torch.float64)
    update_lipschitz(g, n_iterations=50)
    return g.eval()


class Counted(torch.nn.Module):
    """Wraps g and counts its calls and the samples it was called on (the harness' own count).
    A module, like the residual function it wraps: the solvers stop evaluating a sample once
    it has converged (they evaluate a plain callable on the whole batch)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.calls, self.rows = f, 0, 0

    def forward(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        return self.f(x)


def contraction_rate(g, y, steps: int = 30) -> float:
    """Empirical linear rate of x <- y - g(x): geometric mean of residual ratios."""
    with torch.no_grad():
        x = y.clone()
        r0 = None
        r = None
        for _ in range(steps):
            x_new = y - g(x)
            r = (x_new - x).flatten(1).norm(dim=1).max().item()
            if r0 is None:
                r0 = r
            x = x_new
            if r < 1e-13:
                break
    return (r / r0) ** (1.0 / max(1, steps - 1)) if r0 and r else float("nan")


def jacobian_spectrum(g, x) -> dict:
    """Eigenvalues of J_g at the points ``x``: modulus quantiles (over all points and
    eigenvalues) and the fraction with a negative real part -- how far from a
    one-sided spectrum (where acceleration helps most) the problem is."""
    from torch.func import jacrev, vmap

    with torch.no_grad():
        jac = vmap(jacrev(lambda xi: g(xi.unsqueeze(0)).squeeze(0)))(x)
    ev = torch.linalg.eigvals(jac).flatten()
    mod = ev.abs()
    q = torch.quantile(mod, torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=mod.dtype)).tolist()
    return {"modulus_q10_q50_q90_max": q, "negative_real_fraction": float((ev.real < 0).double().mean()),
            "points": int(x.shape[0])}



def trained_flow(c: float, device, seed: int, steps: int):
    """A toy flow trained by maximum likelihood on 8 Gaussians (exact log-det, fast in 2D).

    Its blocks are what a user inverts when sampling: trained, with Lip(g) near the
    bound along the directions the data stretched.
    """
    from iresflow.data.toy2d import sample_toy2d
    from iresflow.models import ResidualFlow
    from iresflow.nn.logdet import ExactLogDet

    torch.manual_seed(seed)
    flow = ResidualFlow(in_shape=(2,), n_blocks=10, hidden=[64, 64], coeff=c, estimator=ExactLogDet()).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = sample_toy2d("8gaussians", 500, gen).to(device)
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow = flow.double().eval()
    x = sample_toy2d("8gaussians", 512, gen).to(device=device, dtype=torch.float64)
    return flow, x


def invert_trained_blocks(flow, x, make_solver, device):
    """Invert every block of ``flow`` at its own inputs (from data ``x``): total evaluations
    of g, total wall time, worst error against the true input, all converged."""
    evals, per_sample, seconds, worst, converged = 0, 0.0, 0.0, 0.0, True
    h = x
    for layer in flow.scales[0].layers:
        if hasattr(layer, "g"):
            with torch.no_grad():
                y = h + layer.g(h)
            solver, f = make_solver(), Counted(layer.g)
            box = {}
            seconds += timed(lambda: box.update(out=solver.solve(f, y)), device)
            xh, info = box["out"]
            evals += f.calls
            per_sample += f.rows / y.shape[0]
            converged &= info.converged
            worst = max(worst, ((xh - h).flatten(1).norm(dim=1) / math.sqrt(h.shape[1])).max().item())
            h = y
        else:
            with torch.no_grad():
                h = layer(h)
    return {"evaluations": evals, "evaluations_per_sample": per_sample, "time_s": seconds,
            "error_vs_true_x": worst, "converged": converged}

def run(ctx: Context) -> dict:
    from iresflow.nn.solvers import AndersonSolver, FixedPointSolver

    dim, batch = (8, 16) if ctx.quick else (32, 256)
    repeats = 1 if ctx.quick else 3
    tol = 1e-6
    solvers = {"fixed_point": lambda: FixedPointSolver(tol=tol, max_iter=2000),
               "anderson": lambda: AndersonSolver(tol=tol, max_iter=500),
               # information: a history as long as the dimension (finite termination on a linear map)
               "anderson_mem_dim": lambda: AndersonSolver(tol=tol, max_iter=500, memory=dim)}
    rows = []
    spectra = {}
    for c in COEFFS:
        g = make_g(c, dim, ctx.device, ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)
        x = (2.0 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)).to(ctx.device)
        with torch.no_grad():
            y = x + g(x)
        rate = contraction_rate(g, y)
        bound = float(g.lipschitz_bound()) if hasattr(g, "lipschitz_bound") else None
        spectra[c] = jacobian_spectrum(g, x[:16])
        for name, make in solvers.items():
            infos, counts, times, errs = [], [], [], []
            for _ in range(repeats):
                solver, f = make(), Counted(g)
                box = {}
                times.append(timed(lambda: box.update(out=solver.solve(f, y)), ctx.device))
                xh, info = box["out"]
                infos.append(info)
                counts.append(f.calls)
                errs.append(((xh - x).flatten(1).norm(dim=1) / math.sqrt(dim)).max().item())
            row = {"c": c, "solver": name, "evaluations": counts[0],
                   "time_per_evaluation_s": median(times) / max(counts[0], 1),
                   "solver_reported_evaluations": infos[0].evaluations,
                   "iterations": infos[0].iterations, "residual": infos[0].residual,
                   "converged": infos[0].converged, "error_vs_true_x": errs[0],
                   "time_s": median(times), "lipschitz_bound": bound, "empirical_rate": rate}
            rows.append(row)
            ctx.log(f"inverse: c={c:<5} {name:12s} evals {counts[0]:4d}  time {median(times)*1e3:7.2f} ms  "
                    f"res {infos[0].residual:.1e}  err {errs[0]:.1e}  (bound {bound}, rate {rate:.3f})")

    def get(c, s, k):
        return next(r[k] for r in rows if r["c"] == c and r["solver"] == s)

    res = {"settings": {"dim": dim, "hidden": [dim, dim], "activation": "elu", "weights": "orthogonal",
                        "batch": batch, "dtype": "float64", "tol": tol, "repeats": repeats,
                        "coeff_per_map": "c**(1/3)", "anderson": {"memory": 5, "beta": 1.0, "lam": 1e-4}},
           "rows": rows, "jacobian_spectrum": spectra,
           "note": ("Anderson (like GMRES) beats the fixed-point rate only where the spectrum of J_g "
                    "leaves room for a polynomial to be small on it; with orthogonal maps the eigenvalues "
                    "of J_g spread around a circle of radius ~ the contraction rate "
                    "(see jacobian_spectrum: modulus quantiles and the fraction with negative real part), "
                    "the known worst case, where a short history cannot do better than the plain rate; a "
                    "history as long as the dimension (anderson_mem_dim) terminates like GMRES on the "
                    "near-linear problem. Each Anderson step also solves a batch of small least-squares "
                    "systems, so it costs more than an evaluation of this small g.")}
    # Trained blocks: the inverse a user runs when sampling from a trained flow.
    steps = 20 if ctx.quick else 400
    trained = {}
    for c in COEFFS:
        flow, xs = trained_flow(c, ctx.device, ctx.seed, steps)
        trained[c] = {}
        names = ("fixed_point", "anderson")
        runs = {name: [] for name in names}
        for r in range(max(repeats, 5) if not ctx.quick else 1):  # interleaved, alternating order
            for name in (names if r % 2 == 0 else names[::-1]):
                runs[name].append(invert_trained_blocks(flow, xs, solvers[name], ctx.device))
        for name in names:
            best = dict(runs[name][0], time_s=median([r["time_s"] for r in runs[name]]))
            trained[c][name] = best
            ctx.log(f"inverse (trained toy flow, 10 blocks): c={c:<5} {name:12s} evals {best['evaluations']:4d} "
                    f"({best['evaluations_per_sample']:.1f} per sample)  time {best['time_s']*1e3:7.2f} ms  "
                    f"err {best['error_vs_true_x']:.1e}")
    res_trained = {"steps": steps, "model": "iresnet_flow (2,), 10 blocks, 2-64-64-2 LipSwish, ActNorm",
                   "data": "8gaussians, batch 512", "rows": trained}

    def tget(c, s, k):
        return trained[c][s][k]

    ev_ratio = tget(0.9, "anderson", "evaluations") / tget(0.9, "fixed_point", "evaluations")
    t_ratio = tget(0.9, "anderson", "time_s") / tget(0.9, "fixed_point", "time_s")
    orth_ev_ratio = get(0.9, "anderson", "evaluations") / get(0.9, "fixed_point", "evaluations")
    orth_t_ratio = get(0.9, "anderson", "time_s") / get(0.9, "fixed_point", "time_s")
    res["trained"] = res_trained
    res["anderson_eval_ratio_c0.9"] = ev_ratio
    res["anderson_time_ratio_c0.9"] = t_ratio
    res["orthogonal_anderson_eval_ratio_c0.9"] = orth_ev_ratio
    res["orthogonal_anderson_time_ratio_c0.9"] = orth_t_ratio
    res["targets"] = [
        target("Anderson / fixed-point evaluations at c=0.9 (trained flow)", ev_ratio, "<=", 1 / 3, unit="x"),
        target("Anderson / fixed-point wall time at c=0.9 (trained flow)", t_ratio, "<", 1.0, unit="x"),
    ]
    res["table"] = []
    for c in COEFFS:
        res["table"].append({
            "metric": f"trained flow, c={c}: evaluations of g, 10 blocks (fixed point / Anderson)",
            "iresflow": f"{tget(c, 'fixed_point', 'evaluations')} / {tget(c, 'anderson', 'evaluations')}",
            "ratio": tget(c, "anderson", "evaluations") / tget(c, "fixed_point", "evaluations"),
            "ratio_meaning": "Anderson / fixed point"})
        res["table"].append({
            "metric": f"trained flow, c={c}: evaluations per sample (converged samples stop), 10 blocks (info)",
            "iresflow": f"{tget(c, 'fixed_point', 'evaluations_per_sample'):.1f} / "
                        f"{tget(c, 'anderson', 'evaluations_per_sample'):.1f}",
            "ratio": tget(c, "anderson", "evaluations_per_sample") / tget(c, "fixed_point", "evaluations_per_sample"),
            "ratio_meaning": "Anderson / fixed point"})
        res["table"].append({
            "metric": f"trained flow, c={c}: wall ms, 10 blocks (fixed point / Anderson)",
            "iresflow": f"{tget(c, 'fixed_point', 'time_s')*1e3:.1f} / {tget(c, 'anderson', 'time_s')*1e3:.1f}",
            "ratio": tget(c, "anderson", "time_s") / tget(c, "fixed_point", "time_s"),
            "ratio_meaning": "Anderson / fixed point"})
    for c in COEFFS:
        res["table"].append({
            "metric": f"orthogonal g (worst case, info), c={c}: evaluations of g (fixed point / Anderson)",
            "iresflow": f"{get(c, 'fixed_point', 'evaluations')} / {get(c, 'anderson', 'evaluations')}",
            "ratio": get(c, "anderson", "evaluations") / get(c, "fixed_point", "evaluations"),
            "ratio_meaning": "Anderson / fixed point"})
        res["table"].append({
            "metric": f"orthogonal g (worst case, info), c={c}: wall ms (fixed point / Anderson)",
            "iresflow": f"{get(c, 'fixed_point', 'time_s')*1e3:.1f} / {get(c, 'anderson', 'time_s')*1e3:.1f}",
            "ratio": get(c, "anderson", "time_s") / get(c, "fixed_point", "time_s"),
            "ratio_meaning": "Anderson / fixed point"})
        res["table"].append({
            "metric": f"c={c}: Anderson with memory = dim (info): evaluations / wall ms",
            "iresflow": f"{get(c, 'anderson_mem_dim', 'evaluations')} / "
                        f"{get(c, 'anderson_mem_dim', 'time_s')*1e3:.1f}",
            "ratio": get(c, "anderson_mem_dim", "evaluations") / get(c, "fixed_point", "evaluations"),
            "ratio_meaning": "evaluations / fixed point"})
        sp = spectra[c]
        res["table"].append({
            "metric": f"c={c}: eigenvalues of J_g, |lambda| median / max; share with Re < 0 (info)",
            "iresflow": f"{sp['modulus_q10_q50_q90_max'][1]:.2f} / {sp['modulus_q10_q50_q90_max'][3]:.2f}; "
                        f"{sp['negative_real_fraction']:.2f}"})
    res["plots"] = [_plot(ctx, rows)]
    return jsonable(res)


def _plot(ctx, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    names = ("fixed_point", "anderson", "anderson_mem_dim")
    w = 0.8 / len(names)
    for i, s in enumerate(names):
        rs = [r for r in rows if r["solver"] == s]
        xs = [j + (i - (len(names) - 1) / 2) * w for j in range(len(rs))]
        axes[0].bar(xs, [r["evaluations"] for r in rs], width=w, label=s)
        axes[1].bar(xs, [r["time_s"] * 1e3 for r in rs], width=w, label=s)
    for ax, lab in zip(axes, ("evaluations of g", "wall time (ms)")):
        ax.set_xticks(range(len(COEFFS)), [f"c={c}" for c in COEFFS])
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle("Inverse to tol 1e-6")
    fig.tight_layout()
    path = os.path.join(ctx.out_dir, "inverse.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
