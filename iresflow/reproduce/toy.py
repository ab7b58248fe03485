"""Fig. 2 of the i-ResNet paper: learned 2D densities of an i-ResNet flow and the Glow baseline.

For every density of the scale, one run per model (``configs/reproduce/toy.yaml``; the two
experiments have nearly equal parameter counts). The table is the test NLL (nats per point) of
each run, with the exact log-det for both; the picture puts, for every density, samples of the
data next to ``exp(log p)`` of each model on a grid (exact log-det too).
"""

from __future__ import annotations

import torch

from iresflow.data.toy2d import sample_toy2d
from iresflow.models.coupling import parameter_count
from iresflow.nn.logdet import ExactLogDet
from iresflow.reproduce.common import Context, load_run

TITLE = "Fig. 2 - learned 2D densities: i-ResNet vs Glow"
QUESTION = ("How does a free-form i-ResNet flow compare with a coupling flow (Glow) of the same size on 2D "
            "densities? The i-ResNet paper's Fig. 2 shows both models' densities; here with their test NLL "
            "(nats per point, exact log-det).")


@torch.no_grad()
def grid_log_prob(model, bound: float, n: int, chunk: int = 4096) -> torch.Tensor:
    """``log p`` on an ``n x n`` grid of ``[-bound, bound]^2`` (rows: y), with the exact log-det."""
    for block in model.blocks:
        block.estimator = ExactLogDet()
    side = torch.linspace(-bound, bound, n)
    yy, xx = torch.meshgrid(side, side, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], 1)
    logp = torch.cat([model.log_prob(points[i:i + chunk]) for i in range(0, len(points), chunk)])
    return logp.view(n, n)


def _plot(panels: list[list[tuple[str, torch.Tensor, str]]], bound: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, cols = len(panels), len(panels[0])
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for r, row in enumerate(panels):
        for c, (title, image, kind) in enumerate(row):
            ax = axes[r][c]
            if kind == "hist":
                ax.hist2d(image[:, 0].numpy(), image[:, 1].numpy(), bins=100,
                          range=[[-bound, bound], [-bound, bound]], cmap="viridis")
            else:
                finite = image[torch.isfinite(image)]
                ax.imshow(torch.exp(image - finite.max()).nan_to_num(0.0).numpy(), origin="lower", cmap="viridis",
                          extent=(-bound, bound, -bound, bound))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(ctx: Context) -> dict:
    s = ctx.settings
    models = ctx.run_names()
    rows, panels, sizes = [], [], {}
    bound = 4.0
    for density in s["densities"]:
        row: dict = {"density": density}
        data = sample_toy2d(density, 20000, torch.Generator().manual_seed(ctx.seed))
        panel = [(f"{density}: data", data, "hist")]
        for m in models:
            name = f"{m}-{density}"
            metrics = ctx.train(m, name=name, extra=[f"data.dataset={density}"])
            row[f"{m}_nll"] = metrics.get("test/nll")
            row[f"{m}_fit_s"] = metrics.get("time/fit_seconds")
            model, _, _ = load_run(ctx.run_dir(name))
            sizes[m] = parameter_count(model)
            nll = row[f"{m}_nll"]
            panel.append((f"{ctx.label(m)}" + (f" (NLL {nll:.2f})" if nll is not None else ""),
                          grid_log_prob(model, bound, s["grid"]), "density"))
        rows.append(row)
        panels.append(panel)
        ctx.say(density + ": " + ", ".join(f"{ctx.label(m)} {row[f'{m}_nll']:.3f}" for m in models))
    figure = ctx.out / "toy.png"
    _plot(panels, bound, figure)
    columns = [("density", "density")] + [(f"{m}_nll", f"{ctx.label(m)} test NLL (nats)") for m in models] \
        + [(f"{m}_fit_s", f"{ctx.label(m)} fit (s)") for m in models]
    return ctx.write(
        title=TITLE, question=QUESTION, figure=figure, rows=rows, columns=columns,
        notes=["parameters: " + ", ".join(f"{ctx.label(m)} {sizes[m]:,}" for m in models),
               "The paper's Fig. 2 is qualitative (densities only); lower NLL is better, and the entropy of "
               "a density bounds it from below (checkerboard: log 32 = 3.47 nats)."],
        extra={"parameters": sizes})
