"""Fig. 1 of the i-ResNet paper: paths of points through a ResNet and an i-ResNet in 1D.

Both networks are ``depth`` blocks ``x <- x + g(x)`` with the same 1-h-h-1 ELU MLP ``g``: the
ResNet's maps are unconstrained (``normalization: none``), the i-ResNet's normalised to ``c``
(``operator``). Trained jointly to map evenly spaced points of ``[-2, 2]`` to a noisy ``x^3``
at half depth and a noisy identity at full depth. A 1D block with ``Lip(g) < 1`` is strictly
increasing, so the i-ResNet keeps the order of the points at every depth; the ResNet is free to
fit the noise, and its paths cross. Crossings are counted on a fine grid of inputs: a pair of
paths crosses when its order at some depth is the reverse of its order at the input.
"""

from __future__ import annotations

import torch
from torch import nn

from iresflow.nn.activations import ELU
from iresflow.nn.lipschitz import keep_up_lipschitz, update_lipschitz
from iresflow.nn.normalization import NoNormalization, OperatorNormalization
from iresflow.nn.residual import MLPResidual
from iresflow.reproduce.common import Context

TITLE = "Fig. 1 - paths through a ResNet and an i-ResNet (1D)"
QUESTION = ("Does a standard ResNet keep the order of its inputs? The i-ResNet paper's Fig. 1: trained to map "
            "[-2, 2] to a noisy x^3 at half depth and a noisy identity at the end, the ResNet's paths cross "
            "(not invertible), the i-ResNet's (Lip(g) < 1) cannot.")


def paths(blocks: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """The points after every block, input first: ``depth + 1`` tensors."""
    out = [x]
    for block in blocks:
        x = x + block(x)
        out.append(x)
    return out


def crossing_pairs(trajectory: list[torch.Tensor]) -> int:
    """Pairs of paths whose order at some depth is reversed relative to the input order."""
    order = torch.argsort(trajectory[0].flatten())
    n = len(order)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    crossed = torch.zeros(n, n, dtype=torch.bool)
    for t in trajectory[1:]:
        v = t.flatten()[order]
        crossed |= (v[:, None] > v[None, :]) & upper
    return int(crossed.sum())


def _network(normalization, settings: dict) -> nn.ModuleList:
    return nn.ModuleList([MLPResidual(1, hidden=[settings["hidden"]] * 2, activation=ELU(), coeff=settings["coeff"],
                                      normalization=normalization) for _ in range(settings["depth"])])


def _train(blocks: nn.ModuleList, x, targets, settings: dict) -> float:
    opt = torch.optim.Adam(blocks.parameters(), lr=settings["lr"])
    half = settings["depth"] // 2
    blocks.train()
    for _ in range(settings["steps"]):
        traj = paths(blocks, x)
        loss = ((traj[half] - targets[0]) ** 2).mean() + ((traj[-1] - targets[1]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        keep_up_lipschitz(blocks, 1)  # what the tasks do after each step (no-op for vanilla's report only)
    blocks.eval()
    update_lipschitz(blocks, 20)
    return float(loss.detach())


def _plot(results: dict, grid: torch.Tensor, path, settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), sharey=True)
    colours = plt.cm.viridis(((grid.flatten() + 2) / 4).numpy())  # an array: a tensor warns in matplotlib
    for ax, (label, res) in zip(axes, results.items()):
        traj = torch.stack([t.flatten() for t in res["paths"]]).numpy()  # [depth + 1, points]
        depth = range(traj.shape[0])
        for i in range(traj.shape[1]):
            ax.plot(depth, traj[:, i], color=colours[i], lw=0.8)
        ax.axvline(settings["depth"] // 2, color="grey", ls=":", lw=0.8)
        ax.set_title(f"{label}: {res['row']['crossing_pairs']} crossing pairs")
        ax.set_xlabel("depth (block)")
    axes[0].set_ylabel("x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: Context) -> dict:
    s = ctx.settings
    gen = torch.Generator().manual_seed(ctx.seed)
    x = torch.linspace(-2.0, 2.0, s["points"]).view(-1, 1)
    targets = (x ** 3 + s["noise"] * torch.randn(x.shape, generator=gen),
               x + s["noise"] * torch.randn(x.shape, generator=gen))
    grid = torch.linspace(-2.0, 2.0, s["grid"]).view(-1, 1)
    results, rows = {}, []
    for label, norm in (("ResNet", NoNormalization()), (f"i-ResNet (c={s['coeff']})", OperatorNormalization())):
        torch.manual_seed(ctx.seed)
        blocks = _network(norm, s)
        loss = _train(blocks, x, targets, s)
        with torch.no_grad():
            traj = paths(blocks, grid)
        pairs = crossing_pairs(traj)
        n = s["grid"]
        row = {"model": label, "final_loss": loss, "crossing_pairs": pairs,
               "crossing_fraction": pairs / (n * (n - 1) / 2),
               "lipschitz_max": max(b.lipschitz_bound() for b in blocks)}
        results[label] = {"paths": traj, "row": row}
        rows.append(row)
        ctx.say(f"{label}: loss {loss:.3f}, {pairs} crossing pairs, max Lip(g) {row['lipschitz_max']:.3g}")
    figure = ctx.out / "dynamics.png"
    ctx.out.mkdir(parents=True, exist_ok=True)
    _plot(results, grid, figure, s)
    return ctx.write(
        title=TITLE, question=QUESTION, figure=figure, rows=rows,
        columns=[("model", "model"), ("final_loss", "training loss"), ("crossing_pairs", "crossing pairs"),
                 ("crossing_fraction", "fraction of pairs"), ("lipschitz_max", "max Lip(g) (estimated)")],
        notes=[f"{s['grid']} paths on a grid of [-2, 2]; {s['depth']} blocks of a 1-{s['hidden']}-{s['hidden']}-1 "
               f"ELU MLP, {s['steps']} Adam steps at lr {s['lr']} on {s['points']} points with noise {s['noise']}.",
               "The paper shows the picture only (no numbers): the ResNet's paths cross and collapse, the "
               "i-ResNet's do not."])
