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
        trained = {}
        for m in models:
            name = f"{m}-{density}"
            metrics = trained[m] = ctx.train(m, name=name, extra=[f"data.dataset={density}"])
            row[f"{m}_nll"] = metrics.get("test/nll")
            row[f"{m}_cpu_s"] = metrics.get("time/train_cpu_seconds")
            model, _, _ = load_run(ctx.run_dir(name))
            sizes[m] = parameter_count(model)
            nll = row[f"{m}_nll"]
            panel.append((f"{ctx.label(m)}" + (f" (NLL {nll:.2f})" if nll is not None else ""),
                          grid_log_prob(model, bound, s["grid"]), "density"))
        # equal compute: every model trained for the training CPU seconds of the costliest one
        budget = max(float(t.get("time/train_cpu_seconds") or 0.0) for t in trained.values())
        for m in models:
            equal, steps = ctx.train_equal_compute(m, trained[m], budget, name=f"{m}-{density}",
                                                   extra=[f"data.dataset={density}"])
            row[f"{m}_nll_equal"], row[f"{m}_steps_equal"] = equal.get("test/nll"), steps
        rows.append(row)
        panels.append(panel)
        ctx.say(density + ": " + ", ".join(f"{ctx.label(m)} {row[f'{m}_nll']:.3f}" for m in models))
    figure = ctx.out / "toy.png"
    _plot(panels, bound, figure)
    columns = [("density", "density")] + [(f"{m}_nll", f"{ctx.label(m)} test NLL (nats)") for m in models] \
        + [(f"{m}_cpu_s", f"{ctx.label(m)} training (CPU s)") for m in models] \
        + [(f"{m}_nll_equal", f"{ctx.label(m)} NLL at equal compute") for m in models] \
        + [(f"{m}_steps_equal", f"{ctx.label(m)} steps at equal compute") for m in models]
    return ctx.write(
        title=TITLE, question=QUESTION, figure=figure, rows=rows, columns=columns,
        notes=["parameters: " + ", ".join(f"{ctx.label(m)} {sizes[m]:,}" for m in models),
               "The paper's Fig. 2 is qualitative (densities only); lower NLL is better, and the entropy of "
               "a density bounds it from below (8 Gaussians: 2.831 nats; checkerboard: log 32 = 3.466; "
               "two spirals: 2.649).",
               "training (CPU s): CPU seconds of this process inside the training steps (forward, backward, "
               "optimiser step, Lipschitz upkeep), not validation, pictures or checkpoints. At equal "
               "compute every model trains for the costliest model's CPU seconds (its steps scaled by the "
               "measured cost per step); the picture shows the equal-step runs.",
               paper_scale_note(ctx, trained_costs(rows, models))],
        extra={"parameters": sizes})


def trained_costs(rows: list[dict], models: list[str]) -> dict[str, float]:
    """Mean training CPU seconds of each model over the densities."""
    return {m: sum(float(r.get(f"{m}_cpu_s") or 0.0) for r in rows) / max(1, len(rows)) for m in models}


def paper_scale_note(ctx: Context, cpu_s: dict[str, float]) -> str:
    """What the paper's scale (the ``paper`` section of the settings) would cost, extrapolated from this
    scale's measured CPU seconds with cost ~ parameters x steps (dense layers: the products dominate)."""
    paper = ((ctx.spec.get("scales") or {}).get("paper") or {})
    m = "iresnet"
    if ctx.scale == "paper" or m not in cpu_s or not paper:
        return "scale `paper` is the paper's: no extrapolation."
    from iresflow.config import load_config
    from iresflow.run.build import build_components

    def parameters(overrides: list[str]) -> int:
        experiment, args = ctx.run_command(m)
        _, model, _ = build_components(load_config([f"experiment={experiment}", *args, *overrides]))
        return sum(p.numel() for p in model.parameters())

    here = parameters([])
    there = parameters(list((paper.get("runs") or {}).get(m) or []))
    steps_here = int(load_config([f"experiment={ctx.run_command(m)[0]}", *ctx.run_command(m)[1]]).trainer.max_steps)
    steps_there = next((int(a.split("=", 1)[1]) for a in paper.get("train") or []
                        if a.startswith("trainer.max_steps=")),
                       steps_here)
    hours = cpu_s[m] * (there / here) * (steps_there / steps_here) / 3600
    return (f"the paper's scale (i-ResNet: {there:,} parameters, {steps_there:,} steps, against {here:,} and "
            f"{steps_here:,} here) would need about {hours:,.0f} CPU-core hours per density at this machine's "
            f"measured cost (cost ~ parameters x steps), so a GPU (`--scale paper` uses `trainer=gpu`).")
