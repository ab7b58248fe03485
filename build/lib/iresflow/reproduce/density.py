"""Table 4 of the i-ResNet paper (Table 1 of Residual Flows): bits/dim, the papers' numbers beside ours.

One run per configuration of ``configs/reproduce/density.yaml``: the i-ResNet style
(``iresnet_multiscale``: ELU, c = 0.9, truncated series), the Residual-Flow style
(``flow_multiscale``: LipSwish, c = 0.98, Russian roulette, Neumann gradients) and the Glow
baseline, all on the same data. At CPU scale that is the 8x8 digits, whose 64 dimensions let the
test bits/dim be taken with the exact log-det (17 levels: the log2(17) offset); at paper scale
MNIST. The picture shows samples of every model (through the inverse).
"""

from __future__ import annotations

import math

import torch

from iresflow.models.coupling import parameter_count
from iresflow.reproduce import papers
from iresflow.reproduce.common import Context, load_run

TITLE = "Table 4 - bits/dim of i-ResNet, Residual Flow and Glow"
QUESTION = ("How well do the residual flows model images, against each other and a coupling flow? The "
            "i-ResNet paper's Table 4 and Residual Flows' Table 1 (bits/dim on MNIST and CIFAR-10), here on "
            "the data of the runs (the 8x8 digits at CPU scale).")


def _plot(samples: dict[str, tuple[torch.Tensor, float | None]], path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(samples), figsize=(3.6 * len(samples), 3.9), squeeze=False)
    for ax, (label, (images, bpd)) in zip(axes[0], samples.items()):
        grid = make_grid(images.clamp(0, 1), nrow=int(len(images) ** 0.5), padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label + ("" if bpd is None else f" ({bpd:.3f} bits/dim)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: Context) -> dict:
    rows, samples, trained = [], {}, {}
    for name in ctx.run_names():
        metrics = trained[name] = ctx.train(name)
        model, dm, cfg = load_run(ctx.run_dir(name))
        torch.manual_seed(ctx.seed)
        images = model.sample(int(ctx.settings.get("samples", 16))).float().reshape(-1, *dm.dims)
        label = ctx.label(name)
        bpd = metrics.get("test/bpd")
        samples[label] = (images.nan_to_num(0.0), bpd)
        estimator = (cfg.get("task") or {}).get("eval_estimator") or (cfg["model"].get("estimator") or {})
        rows.append({"model": label, "data": cfg["data"]["name"], "test_bpd": bpd,
                     "test_nll": metrics.get("test/nll"), "parameters": parameter_count(model),
                     "scored_with": (estimator or {}).get("name", "exact (coupling)") if model.blocks else "exact",
                     "lipschitz_max": metrics.get("test/lipschitz_max"),
                     "cpu_s": metrics.get("time/train_cpu_seconds"), "steps": metrics.get("trainer/global_step")})
        ctx.say(f"{label}: test {bpd:.4f} bits/dim" if bpd is not None else f"{label}: no test/bpd")
    # equal compute: every model trained for the training CPU seconds of the costliest one
    budget = max(float(m.get("time/train_cpu_seconds") or 0.0) for m in trained.values())
    for row, name in zip(rows, trained):
        equal, steps = ctx.train_equal_compute(name, trained[name], budget, name=name)
        row["bpd_equal"], row["steps_equal"] = equal.get("test/bpd"), steps
    figure = ctx.out / "density.png"
    _plot(samples, figure)
    paper = papers.DENSITY_BPD
    for row in rows:
        reported = paper["rows"].get(row["model"], [None, None])
        row["paper_mnist"], row["paper_cifar10"] = reported
    columns = [("model", "model"), ("data", "data"), ("test_bpd", "test bits/dim, ours"), ("scored_with", "log-det"),
               ("parameters", "parameters"), ("steps", "steps"), ("cpu_s", "training (CPU s)"),
               ("bpd_equal", "bits/dim at equal compute"), ("steps_equal", "steps at equal compute"),
               ("paper_mnist", "paper MNIST"), ("paper_cifar10", "paper CIFAR10")]
    return ctx.write(
        title=TITLE, question=QUESTION, figure=figure, rows=rows, columns=columns, paper=paper,
        notes=["the digits have 17 grey levels: bits/dim = -log p(x) / (D ln 2) + log2(17), a uniform density "
               "scores log2(17) = 4.087; MNIST's 8-bit offset is 8 bits. The two are not comparable numbers: "
               "the papers' columns are for their data and their (far larger) models.",
               "training (CPU s): CPU seconds of this process inside the training steps (not validation, "
               "pictures or checkpoints). At equal compute every model trains for the costliest model's CPU "
               "seconds (its steps scaled by its measured cost per step).",
               paper_scale_note(ctx, rows),
               papers.CHECK_NOTE])


def paper_scale_note(ctx: Context, rows: list[dict]) -> str:
    """What the paper's scale (the ``paper`` section of the settings: MNIST) would cost for the i-ResNet,
    extrapolated from its measured CPU seconds here with cost ~ parameters x pixels x steps (an order of
    magnitude: convolutions cost their parameters once per output pixel)."""
    from iresflow.config import load_config
    from iresflow.run.build import build_components

    paper = (ctx.spec.get("scales") or {}).get("paper") or {}
    mine = next((r for r in rows if r["model"] == ctx.label("iresnet")), None)
    if ctx.scale == "paper" or mine is None or not mine.get("cpu_s") or "iresnet" not in (paper.get("runs") or {}):
        return "scale `paper` is the paper's (or no i-ResNet run): no extrapolation."
    node = paper["runs"]["iresnet"]
    cfg = load_config([f"experiment={node['experiment']}", *(paper.get("train") or []), *node.get("overrides", [])])
    dm, model, _ = build_components(cfg)
    params, pixels = sum(p.numel() for p in model.parameters()), math.prod(dm.dims[1:])
    here = load_config([f"experiment={ctx.run_command('iresnet')[0]}", *ctx.run_command("iresnet")[1]])
    steps = int(cfg.trainer.max_epochs) * math.ceil(60000 / int(cfg.data.batch_size))  # MNIST's 60k
    ratio = (params / mine["parameters"]) * (pixels / 64) * (steps / float(mine["steps"])) \
        * (int(cfg.data.batch_size) / int(here.data.batch_size))
    hours = float(mine["cpu_s"]) * ratio / 3600
    return (f"the paper's scale for the i-ResNet (MNIST, {params:,} parameters, {cfg.trainer.max_epochs} epochs = "
            f"{steps:,} steps of {cfg.data.batch_size}) is about {ratio:,.0f} times this run's compute: of the "
            f"order of {hours:,.0f} CPU-core hours at this machine's cost, so GPUs (`--scale paper`).")
