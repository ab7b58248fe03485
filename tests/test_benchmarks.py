"""Smoke test of the benchmark harness: the whole thing at tiny sizes (--quick)
on CPU, then the structure of the JSON it writes."""

import json

import pytest

pytest.importorskip("normflows",
                    reason="the bench extra (normflows, the reference) is not installed: pip install -e .[bench]")

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.common import target  # noqa: E402
from benchmarks.flows import match_normflows_terms  # noqa: E402


def test_target_logic():
    assert target("a", 2.5, ">=", 2.0)["passed"]
    assert not target("a", 1.9, ">=", 2.0)["passed"]
    assert target("b", 0.2, "<=", 0.25)["passed"]
    assert not target("c", None, "<=", 1.0)["passed"]  # a missing value never passes


def test_normflows_term_distribution_matched():
    """normflows' geometric N starts at 1: its "2 exact terms" always includes term 3."""
    import numpy as np

    rng = np.random.default_rng(0)
    n_normflows = rng.geometric(0.5, 200_000) + 2          # normflows: k + N, N >= 1
    k = match_normflows_terms(2)
    assert n_normflows.min() == k                             # k terms always present
    # iresflow: k + N with P(N >= j) = (1-p)^j  ->  same tail
    for j in range(5):
        assert abs((n_normflows >= k + j).mean() - 0.5 ** j) < 0.01


def test_quick_run_writes_results(tmp_path):  # about 5 s on one core
    out = tmp_path / "res"
    rc = bench_run.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), "--quiet"])
    data = json.loads((out / "results.json").read_text())
    assert rc in (0, 1)
    for key in ("schema_version", "created", "command", "mode", "device", "machine", "versions",
                "benchmarks", "targets", "summary"):
        assert key in data, key
    assert data["mode"] == "quick" and data["device"] == "cpu"
    assert set(data["benchmarks"]) == set(bench_run.BENCHMARKS)
    assert data["versions"]["torch"] and data["versions"]["normflows"]
    for name, r in data["benchmarks"].items():
        assert r["status"] in ("ok", "skipped", "error"), name
        assert isinstance(r["seconds"], (int, float))
        for t in r["targets"]:
            assert {"name", "value", "op", "threshold", "passed"} <= set(t)
        for p in r.get("plots", []):
            assert (out / p).exists(), p
    assert data["benchmarks"]["cifar"]["status"] == "skipped"  # CUDA only
    # every benchmark runs once the components exist
    errors = {n: r.get("error") for n, r in data["benchmarks"].items() if r["status"] == "error"}
    assert not errors, errors
    toy = data["benchmarks"]["toy"]
    assert toy["speedup_median"] > 0
    # the estimators must cost the same on both sides for the ratio to mean anything
    terms = toy["mean_series_terms"]
    assert terms["iresflow"] and terms["normflows"]
    assert {"iresflow", "normflows"} <= set(toy["time"])
    # the ablations of the fast paths, and the papers' upkeep, are timed in the same rounds
    assert set(toy["variants"]) == {"without_dense_jacobian", "without_onednn", "generic_autograd_path",
                                    "papers_upkeep"}
    assert all(v["speedup_median"] > 0 for v in toy["variants"].values())
    assert data["benchmarks"]["image"]["peak_memory_ratio"] > 0
    assert "jacobian_spectrum" in data["benchmarks"]["inverse"]
    trained = data["benchmarks"]["inverse"]["trained"]["rows"]
    assert all(0 < r["evaluations_per_sample"] <= r["evaluations"] for rows in trained.values() for r in rows.values())
    # the variance of the log-det per trace estimator, at stated costs; the exact trace has none
    traces = data["benchmarks"]["estimator"]["trace_estimators"]["rows"]
    for entries in traces.values():
        by_label = {e["label"]: e for e in entries}
        assert by_label["exact"]["variance"] < 1e-20 and all(e["cost"] > 0 for e in entries)
    # cost growth: an exponent per size, memory flat in the series length for memory_efficient
    studies = data["benchmarks"]["scaling"]["studies"]
    assert {"batch", "width", "depth", "series length (memory_efficient)"} <= set(studies)
    assert abs(studies["series length (memory_efficient)"]["memory_exponent"]) < 0.2
    assert (out / "results.md").read_text().startswith("# iresflow benchmarks")
    assert data["summary"]["targets_total"] == len(data["targets"]) >= 9
