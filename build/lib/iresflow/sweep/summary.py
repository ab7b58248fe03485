"""The sweep's summary: ``summary.csv`` (every parameter and metric of every run),
``summary.md`` (the swept parameters, the spec's metric with the best run in bold, each run's
status; the failed runs with their log tail, the interrupted ones with how to resume them) and
``summary.png`` (the metric against the swept parameters, :mod:`iresflow.sweep.plot`)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Sequence

from iresflow.sweep.expand import swept_names
from iresflow.sweep.outcome import RunResult, error_line
from iresflow.sweep.spec import sweep_name

__all__ = ["write_summary", "cell", "metric_value", "FINISHED"]

FINISHED = ("finished", "cached")


def cell(value: Any) -> str:
    """A value as a table cell (floats to 6 significant digits)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {cell(v)}" for k, v in value.items()) + "}"
    return str(value)


def metric_value(result: RunResult, name: str | None) -> float | None:
    """The run's value of metric ``name`` as a finite float, else None."""
    if not name or name not in result.metrics:
        return None
    try:
        v = float(result.metrics[name])
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _status_cell(result: RunResult) -> str:
    if result.status == "failed":
        return f"failed: {error_line(result.error)[:80]}"
    if result.status in ("interrupted", "busy") and result.returncode is not None:
        return f"{result.status} (exit {result.returncode})"
    return result.status


def write_summary(results: list[RunResult], spec: dict[str, Any], out: str | os.PathLike[str],
                  extra_metrics: Sequence[str] = ()) -> dict[str, Path]:
    """Write the summary files into ``out``; returns their paths by kind (``csv``, ``md``, ``png``)."""
    from iresflow.sweep.plot import plot_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = (spec.get("metric") or {}).get("name")
    goal = (spec.get("metric") or {}).get("goal", "minimize")
    swept = swept_names(spec)
    fixed = [k for k in (results[0].config if results else {}) if k not in swept]
    all_metrics = sorted({k for r in results for k in r.metrics} - {metric})

    csv_path = out / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", *swept, metric or "metric", "status", "wall_time_s", "attempts", *fixed, *all_metrics,
                    "error"])
        for r in results:
            w.writerow([r.run_id, *(cell(r.config.get(k)) for k in swept), cell(metric_value(r, metric)), r.status,
                        cell(r.wall_time), len(r.attempts), *(cell(r.config.get(k)) for k in fixed),
                        *(cell(r.metrics.get(k)) for k in all_metrics), error_line(r.error)])

    values = [(metric_value(r, metric), r) for r in results if metric_value(r, metric) is not None]
    best = (min if goal == "minimize" else max)(values, key=lambda t: t[0])[1] if values else None
    extra = [m for m in extra_metrics if m != metric]
    count = {s: sum(r.status == s for r in results) for s in ("failed", "interrupted", "busy")}
    md = [f"# Sweep `{sweep_name(spec)}`", ""]
    if spec.get("description"):
        md += [str(spec["description"]).strip(), ""]
    tally = ", ".join([f"{sum(r.status in FINISHED for r in results)} finished", f"{count['failed']} failed"]
                      + [f"{n} {s}" for s, n in count.items() if n and s != "failed"])
    md += [f"method: {spec.get('method')}; metric: `{metric}` ({goal}); runs: {len(results)} ({tally})", ""]
    if fixed:
        md += ["fixed: " + ", ".join(f"`{k}={cell(results[0].config[k])}`" for k in fixed), ""]
    header = [*swept, metric or "metric", *extra, "status", "attempts", "wall time (s)", "run"]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        m = cell(metric_value(r, metric))
        if r is best:
            m = f"**{m}**"
        row = [*(cell(r.config.get(k)) for k in swept), m, *(cell(r.metrics.get(k)) for k in extra),
               _status_cell(r).replace("|", "\\|"), str(len(r.attempts)),
               "" if r.wall_time is None else f"{r.wall_time:.3g}", f"`{r.run_id}`"]
        md.append("| " + " | ".join(row) + " |")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        md += ["", "## Failed runs", ""]
        for r in failed:
            md += [f"### `{r.run_id}` (exit {r.returncode})", "", f"log: `{r.run.log_path}`", "", "```",
                   r.error.strip() or "(no output)", "```", ""]
    interrupted = [r for r in results if r.status == "interrupted"]
    if interrupted:
        md += ["", "## Interrupted runs", "",
               "Run the same sweep command again: each resumes from its checkpoint (`ckpt_path=auto`).", ""]
        md += [f"- `{r.run_id}`: attempt {len(r.attempts)}, exit {r.returncode}; log `{r.run.log_path}`"
               for r in interrupted]
    md_path = out / "summary.md"
    md_path.write_text("\n".join(md).rstrip() + "\n")
    paths = {"csv": csv_path, "md": md_path}
    png = plot_summary(results, spec, out / "summary.png")
    if png is not None:
        paths["png"] = png
    return paths
