"""Table 2 of the i-ResNet paper: classification error against c, and the unconstrained Vanilla.

Runs through the real sweep machinery, as a user would: ``python -m iresflow sweep
sweeps/reproduce_classification.yaml`` (the grid over c with the operator-norm normalisation)
and the same spec once more with the ``vanilla`` overrides of ``configs/reproduce/classification.yaml``
(normalisation off, c fixed). Every run is an ordinary run folder of the sweep; the table reads
their ``config.yaml`` and ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from iresflow.reproduce import papers
from iresflow.reproduce.common import Context, read_json, repo_path

TITLE = "Table 2 - classification error against the Lipschitz bound c"
QUESTION = ("What does the Lipschitz constraint cost a classifier? The i-ResNet paper's Table 2: the same "
            "classifier without the constraint (Vanilla) and with c = 0.9 ... 0.5.")


def sweep_runs(folder: Path) -> list[dict]:
    """``{normalization, coeff, metrics, run}`` of every finished run of a sweep folder."""
    out = []
    for metrics_file in sorted(folder.glob("*/metrics.json")):
        cfg = yaml.safe_load((metrics_file.parent / "config.yaml").read_text())
        model = cfg["model"]
        norm = model.get("normalization") or {"name": "operator"}
        out.append({"normalization": norm.get("name") if isinstance(norm, dict) else str(norm),
                    "coeff": float(model["coeff"]), "metrics": read_json(metrics_file),
                    "run": metrics_file.parent.name})
    return out


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    constrained = [r for r in rows if r["model"] != "Vanilla"]
    ax.plot([r["coeff"] for r in constrained], [r["test_error_pct"] for r in constrained], "o-",
            label="i-ResNet (ours)")
    for r in rows:
        if r["model"] == "Vanilla":
            ax.axhline(r["test_error_pct"], color="C1", ls="--", label="Vanilla (ours)")
    paper = papers.CLASSIFICATION_ERROR["rows"]
    cs = [0.5, 0.6, 0.7, 0.8, 0.9]
    for col, name, colour in ((0, "MNIST", "C2"), (1, "CIFAR10", "C3")):
        ax.plot(cs, [paper[f"c={c}"][col] for c in cs], "s:", color=colour, alpha=0.7, label=f"paper, {name}")
        ax.axhline(paper["Vanilla"][col], color=colour, ls=":", alpha=0.4)
    ax.set_xlabel("c (Lipschitz bound of every normalised map)")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: Context) -> dict:
    spec = repo_path("sweeps", f"{ctx.spec['spec']}.yaml")
    common = [*(ctx.settings.get("sweep") or []), *ctx.overrides]
    constrained = ctx.sweep("sweep", spec, common)
    vanilla = ctx.sweep("vanilla", spec, [*(ctx.settings.get("sweep") or []), *ctx.spec["vanilla"], *ctx.overrides])
    found = [{**r, "model": "Vanilla"} for r in sweep_runs(vanilla)]
    found += [{**r, "model": f"c={r['coeff']:g}"} for r in sorted(sweep_runs(constrained), key=lambda r: -r["coeff"])]
    paper = papers.CLASSIFICATION_ERROR
    rows = []
    for r in found:
        m = r["metrics"]
        reported = paper["rows"].get(r["model"], [None, None, None])
        rows.append({"model": r["model"], "normalization": r["normalization"], "coeff": r["coeff"],
                     "test_error_pct": 100.0 * (1.0 - float(m["test/acc"])), "recon_error": m.get("test/recon_error"),
                     "lipschitz_max": m.get("test/lipschitz_max"), "solver_converged": m.get("test/solver_converged"),
                     "fit_s": m.get("time/fit_seconds"), "run": r["run"],
                     "paper_mnist": reported[0], "paper_cifar10": reported[1], "paper_cifar100": reported[2]})
        ctx.say(f"{r['model']}: test error {rows[-1]['test_error_pct']:.2f}%")
    figure = ctx.out / "classification.png"
    _plot(rows, figure)
    columns = [("model", "model"), ("test_error_pct", "test error, ours (%)"), ("lipschitz_max",
                                                                                        "max Lip(g), certified bound"),
               ("recon_error", "block inverse error"), ("solver_converged", "solves converged"),
               ("fit_s", "fit (s)"), ("paper_mnist", "paper MNIST"), ("paper_cifar10", "paper CIFAR10"),
               ("paper_cifar100", "paper CIFAR100")]
    return ctx.write(
        title=TITLE, question=QUESTION, figure=figure, rows=rows, columns=columns, paper=paper,
        notes=[f"ours: sweeps/{spec.name} ({len(rows)} runs) on the data of its experiment (default: the 8x8 digits, "
               "360 test images, so one image is 0.28%); the paper: MNIST / CIFAR with the i-ResNet-39 (Table 2).",
               "block inverse error: the largest RMS of block.inverse(block(h)) - h on a test batch; the Vanilla "
               "ResNet's is not guaranteed.",
               "max Lip(g), certified bound: the largest product over a block of its maps' norms, each never below "
               "the real one: a conv operator's exact norm when its input or output side is small (materialised), "
               "else its circular-convolution norm on the padded grid (a few % above on 8x8 maps). Each map is "
               "normalised to the exact norm c of its zero-padded operator, so a constrained row above c**3 is "
               "the bound's slack (none on the digits: every map there has a small side).",
               papers.CHECK_NOTE],
        extra={"sweeps": {"constrained": str(constrained), "vanilla": str(vanilla)}})
