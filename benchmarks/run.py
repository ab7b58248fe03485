"""Run every benchmark in one process; print a table; write JSON, Markdown, plots.

    python -m benchmarks.run                     # all, full size, GPU if present
    python -m benchmarks.run --quick             # tiny sizes: a smoke test (seconds)
    python -m benchmarks.run --only toy,inverse  # a subset
    python -m benchmarks.run --device cpu --profile

Results go to ``benchmarks/results/<device>/`` (``<device>-quick`` with
--quick, so a smoke run never overwrites recorded figures): ``results.json``,
``results.md`` and the PNG plots. Exit status 0 even when targets fail (the
table says so); 1 when a benchmark raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
import traceback

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

from benchmarks.common import Context, jsonable, machine_info, now_iso, resolve_device, versions  # noqa: E402

# name -> module (benchmarks/<module>.py with TITLE and run(ctx) -> dict)
BENCHMARKS = {
    "toy": "benchmarks.toy",
    "image": "benchmarks.image",
    "memory": "benchmarks.memory",
    "inverse": "benchmarks.inverse",
    "estimator": "benchmarks.estimator",
    "lipschitz": "benchmarks.lipschitz",
    "scaling": "benchmarks.scaling",
    "cifar": "benchmarks.cifar",
    "checkpoint": "benchmarks.checkpoint",
}
SCHEMA_VERSION = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    p.add_argument("--only", action="append", default=None,
                   help=f"benchmark name(s), comma separated or repeated; of {', '.join(BENCHMARKS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>[-quick])")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--profile", action="store_true",
                   help="also write torch.profiler tables of the training steps (profile_*.txt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    return p.parse_args(argv)


def select(only) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {', '.join(BENCHMARKS)}")
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = resolve_device(args.device)
    dev_tag = device.type + ("-quick" if args.quick else "")
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", dev_tag)
    os.makedirs(out_dir, exist_ok=True)
    ctx = Context(device=device, quick=args.quick, out_dir=out_dir, seed=args.seed,
                  profile=args.profile, verbose=not args.quiet)
    names = select(args.only)

    report = {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "command": "python -m benchmarks.run "
                   + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "mode": "quick" if args.quick else "full",
        "device": device.type,
        "machine": machine_info(device),
        "versions": versions(),
        "seed": args.seed,
        "benchmarks": {},
    }
    failed = False
    t_all = time.perf_counter()
    for name in names:
        mod = importlib.import_module(BENCHMARKS[name])
        print(f"[{name}] {mod.TITLE}", flush=True)
        t0 = time.perf_counter()
        try:
            torch.manual_seed(args.seed)
            if getattr(mod, "CUDA_ONLY", False) and not ctx.cuda:
                res = {"status": "skipped", "reason": "CUDA only", "targets": [], "table": []}
            else:
                res = mod.run(ctx)
                res.setdefault("status", "ok")
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
            failed = True
            res = {"status": "error", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(), "targets": [], "table": []}
            print(f"  ERROR {type(e).__name__}: {e}", flush=True)
        if args.no_plots:
            for p in res.get("plots", []):
                if p and os.path.exists(p):
                    os.remove(p)
            res["plots"] = []
        res["plots"] = [os.path.relpath(p, out_dir) for p in res.get("plots", []) if p]
        res["title"] = mod.TITLE
        res["seconds"] = round(time.perf_counter() - t0, 2)
        report["benchmarks"][name] = jsonable(res)
        _write(report, out_dir)  # after each benchmark: a crash later keeps what was measured
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["targets"] = [dict(t, benchmark=n) for n, r in report["benchmarks"].items() for t in r.get("targets", [])]
    report["summary"] = {"targets_passed": sum(t["passed"] for t in report["targets"]),
                         "targets_total": len(report["targets"]),
                         "errors": [n for n, r in report["benchmarks"].items() if r["status"] == "error"]}
    _write(report, out_dir)
    print()
    print(render_text(report))
    print(f"\nwrote {os.path.join(out_dir, 'results.json')} and results.md "
          f"({report['total_seconds']} s)")
    return 1 if failed else 0


# --------------------------------------------------------------------------- output
def _write(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(render_markdown(report))


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        a = abs(v)
        if a != 0 and (a >= 1e5 or a < 1e-2):
            return f"{v:.2e}"
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    return str(v)


def _target_str(t: dict) -> str:
    if t["unit"] == "fraction":
        return f"{t['op']} {t['threshold']*100:.0f}%"
    return f"{t['op']} {t['threshold']:.3g}"


def rows(report: dict) -> list[list[str]]:
    """Flat table: benchmark, metric, iresflow, normflows, ratio, target, pass."""
    out = []
    for name, r in report["benchmarks"].items():
        if r["status"] != "ok":
            why = r.get("error") or r.get("reason") or ""
            out.append([name, r["status"].upper(), why[:80], "", "", "", ""])
            continue
        for row in r.get("table", []):
            ratio = row.get("ratio")
            rs = _fmt(ratio) + (f" ({row['ratio_meaning']})" if ratio is not None and row.get("ratio_meaning") else "")
            out.append([name, row["metric"], _fmt(row.get("iresflow")), _fmt(row.get("normflows")), rs, "", ""])
        for t in r.get("targets", []):
            v = t["value"]
            vs = (f"{v*100:.1f}%" if t["unit"] == "fraction" else _fmt(v)) if v is not None else "-"
            out.append([name, "TARGET " + t["name"], "", "", vs, _target_str(t), "PASS" if t["passed"] else "FAIL"])
    return out


HEAD = ["benchmark", "metric", "iresflow", "normflows", "ratio", "target", "pass"]


def render_text(report: dict) -> str:
    table = [HEAD] + rows(report)
    widths = [min(60, max(len(r[i]) for r in table)) for i in range(len(HEAD))]
    lines = []
    for k, r in enumerate(table):
        lines.append("  ".join(c[:widths[i]].ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    s = report.get("summary", {})
    if s:
        lines.append(f"\ntargets passed: {s['targets_passed']}/{s['targets_total']}"
                     + (f"; errors in: {', '.join(s['errors'])}" if s["errors"] else ""))
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    lines = [f"# iresflow benchmarks ({report['device']}, {report['mode']})", "",
             f"- created: {report['created']}  ",
             f"- command: `{report['command']}`  ",
             f"- machine: {m.get('processor')}, {m.get('cpu_count')} cores, torch threads "
             f"{m.get('torch_threads')}" + (f", GPU {m['gpu']}" if m.get("gpu") else "") + "  ",
             f"- versions: python {v.get('python')}, torch {v.get('torch')}, iresflow {v.get('iresflow')} "
             f"({v.get('iresflow_git')}), normflows {v.get('normflows')}", ""]
    targets = report.get("targets") or [dict(t, benchmark=n) for n, r in report["benchmarks"].items()
                                         for t in r.get("targets", [])]
    if targets:
        lines += ["## Targets", "", "| benchmark | target | measured | required | pass |", "|---|---|---|---|---|"]
        for t in targets:
            val = t["value"]
            vs = (f"{val*100:.1f}%" if t["unit"] == "fraction" else _fmt(val)) if val is not None else "-"
            lines.append(f"| {t['benchmark']} | {t['name']} | {vs} | {_target_str(t)} | "
                         f"{'PASS' if t['passed'] else '**FAIL**'} |")
        lines.append("")
    lines += ["## All figures", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in rows(report):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    lines.append("")
    for name, r in report["benchmarks"].items():
        lines += [f"## {name}: {r.get('title', '')}", ""]
        if r.get("settings"):
            lines.append(f"settings: `{json.dumps(r['settings'], separators=(',', ':'))}`")
            lines.append("")
        lines.append(f"status {r['status']}, {r.get('seconds')} s")
        for p in r.get("plots", []):
            lines += ["", f"![{name}]({p})"]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
