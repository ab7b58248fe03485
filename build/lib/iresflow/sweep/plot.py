"""``summary.png``: a sweep's metric against its swept parameters.

With a numeric swept parameter, it is the x axis (the one with the most distinct values; log
scale when they span a factor 8 or more) and every combination of the other swept parameters
is a line; with none, one bar per configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from iresflow.sweep.expand import swept_names
from iresflow.sweep.outcome import RunResult
from iresflow.sweep.plan import label as _label
from iresflow.sweep.spec import sweep_name
from iresflow.sweep.summary import cell as _cell, metric_value

__all__ = ["plot_summary"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_summary(runs: list[RunResult], spec: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """The metric against the swept parameter: a line per combination of the other swept
    parameters when one of them is numeric, else bars per configuration."""
    metric = (spec.get("metric") or {}).get("name")
    points = [(r, metric_value(r, metric)) for r in runs]
    points = [(r, m) for r, m in points if m is not None]
    if not metric or not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    swept = swept_names(spec)
    numeric = [k for k in swept if all(_is_number(r.config.get(k)) for r, _ in points)
               and len({r.config.get(k) for r, _ in points}) > 1]
    n_missing = len(runs) - len(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if numeric:
        # the x axis: the numeric parameter with the most distinct values
        x_key = max(numeric, key=lambda k: len({r.config.get(k) for r, _ in points}))
        others = [k for k in swept if k != x_key]
        groups: dict[tuple, list[tuple[float, float]]] = {}
        for r, m in points:
            label = tuple(_cell(r.config.get(k)) for k in others)
            groups.setdefault(label, []).append((float(r.config[x_key]), m))
        for label, xy in sorted(groups.items()):
            xy.sort()
            text = ", ".join(f"{_label(k)}={v}" for k, v in zip(others, label)) or None
            ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=text)
        xs = sorted({float(r.config[x_key]) for r, _ in points})
        if xs[0] > 0 and xs[-1] / xs[0] >= 8:
            ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
        if len(xs) <= 12:
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_xlabel(x_key)
        if any(label for label in groups if label):
            ax.legend(fontsize=8)
    else:
        labels = [", ".join(f"{_label(k)}={_cell(r.config.get(k))}" for k in swept) or r.run_id
                  for r, _ in points]
        ax.bar(range(len(points)), [m for _, m in points], color="tab:blue")
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels(labels, rotation=30 if max(map(len, labels)) > 12 else 0, ha="right", fontsize=8)
        lo, hi = min(m for _, m in points), max(m for _, m in points)
        pad = 0.1 * (hi - lo) if hi > lo else 0.1 * abs(hi) or 1.0
        if lo > 0 and lo - pad > 0 and hi - lo < 0.5 * hi:  # zoom in where the bars differ little
            ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(metric)
    goal = (spec.get("metric") or {}).get("goal", "minimize")
    title = f"{sweep_name(spec)}: {metric} ({'lower' if goal == 'minimize' else 'higher'} is better)"
    if n_missing:
        title += f"; {n_missing} run(s) without a result not shown"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
