"""`iresflow reproduce` at the tiny scale: every target writes its picture and tables, with finite
numbers ordered as the paper says where that is robust; reruns skip what is done; bad input is one
line with exit code 2. The targets that train (a few `python -m iresflow train` processes each)
are marked slow."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from iresflow.reproduce import TARGETS, main
from iresflow.sweep import load_spec, plan

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("sklearn", reason="the digits need scikit-learn (pip install 'iresflow[digits]')")


def _reproduce(target, out, *extra):
    code = main([target, "--scale", "tiny", "--out", str(out), *extra])
    assert code == 0
    result = json.loads((out / f"{target}.json").read_text())
    assert (out / result["figure"]).is_file() and (out / result["figure"]).stat().st_size > 1000
    md = (out / f"{target}.md").read_text()
    assert md.startswith("# ") and "| " in md and "Wall time" in md
    assert result["scale"] == "tiny" and result["wall_time_s"] > 0 and result["rows"]
    return result


def _finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_dynamics_resnet_paths_cross_and_iresnet_paths_do_not(tmp_path, capsys):
    result = _reproduce("dynamics", tmp_path / "a")
    resnet, iresnet = result["rows"]
    assert resnet["model"] == "ResNet" and iresnet["model"].startswith("i-ResNet")
    assert resnet["crossing_pairs"] > 0 and iresnet["crossing_pairs"] == 0
    assert resnet["lipschitz_max"] > 1.0 > iresnet["lipschitz_max"]
    assert _finite(resnet["final_loss"], iresnet["final_loss"])
    # a rerun finds the table up to date and changes nothing
    before = (tmp_path / "a" / "dynamics.json").read_text()
    capsys.readouterr()
    assert main(["dynamics", "--scale", "tiny", "--out", str(tmp_path / "a")]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "a" / "dynamics.json").read_text() == before
    # deterministic for a seed: the same numbers in another folder
    again = _reproduce("dynamics", tmp_path / "b")
    assert again["rows"] == result["rows"]


def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["dynamis", "--scale", "tiny"])
    assert exc.value.code == 2
    capsys.readouterr()
    # a bad override reaches the training run, which refuses it: the reproduction says so in one line
    code = main(["toy", "--scale", "tiny", "--out", str(tmp_path), "model.n_blokcs=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "n_blokcs" in err[0] and "log:" in err[0]


def test_command_line_entry_point():
    out = subprocess.run([sys.executable, "-m", "iresflow.reproduce", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0
    assert all(name in out.stdout for name in TARGETS)


@pytest.mark.parametrize("name,runs", [("reproduce_classification", 5), ("ablation_normalization", 3)])
def test_new_sweep_specs_are_wandb_specs(name, runs, tmp_path):
    path = REPO / "sweeps" / f"{name}.yaml"
    assert path.read_text().startswith("# Question:")
    spec = load_spec(path)
    assert spec["command"][-1] == "${args_no_hyphens}" and spec["method"] == "grid"
    assert len(plan(spec, tmp_path)) == runs


@pytest.mark.slow
def test_reconstruction_vanilla_fails_where_the_iresnet_succeeds(tmp_path, capsys):
    result = _reproduce("reconstruction", tmp_path)
    rows = {r["model"]: r for r in result["rows"]}
    iresnet, vanilla = rows["i-ResNet c=0.9"], rows["Vanilla ResNet"]
    assert iresnet["recon_rms_max"] < 1e-4 and iresnet["blocks_converged"] == iresnet["blocks"]
    assert 0.9 ** 3 * (1 - 1e-6) <= iresnet["lipschitz_max"] < 1.0  # certified (conv maps: a bound above c)
    assert vanilla["blocks_converged"] < vanilla["blocks"] and vanilla["solver_warnings"] > 0
    assert vanilla["lipschitz_max"] > 1.0
    assert vanilla["recon_rms_median"] > 1000 * iresnet["recon_rms_median"]
    assert _finite(iresnet["test_error_pct"], vanilla["test_error_pct"])
    # the trained runs are reused: redoing the analysis trains nothing
    capsys.readouterr()
    assert main(["reconstruction", "--scale", "tiny", "--out", str(tmp_path), "--fresh"]) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 2 and " train ..." not in out


@pytest.mark.slow
def test_estimator_truncation_bias_shrinks_and_roulette_is_unbiased(tmp_path):
    rows = _reproduce("estimator", tmp_path)["rows"]
    first, last = rows[0], rows[-1]
    assert abs(last["truncated_bias"]) < abs(first["truncated_bias"]) / 100
    assert abs(first["truncated_bias"]) > 5 * first["roulette_stderr"]  # a bias the roulette would show
    for r in rows:
        assert abs(r["roulette_bias"]) <= 4 * r["roulette_stderr"] + 1e-12
        assert r["roulette_terms"] > r["n"]  # the random tail costs terms
        assert _finite(r["truncated_std"], r["roulette_std"]) and r["truncated_std"] > 0


@pytest.mark.slow
def test_toy_densities_of_both_models(tmp_path):
    result = _reproduce("toy", tmp_path)
    (row,) = result["rows"]
    assert row["density"] == "8gaussians" and _finite(row["iresnet_nll"], row["glow_nll"])
    sizes = result["extra"]["parameters"]
    assert abs(sizes["glow"] / sizes["iresnet"] - 1) < 0.05  # compared at (nearly) equal size
    _check_equal_compute(row, ["iresnet", "glow"], 30)
    assert any("CPU-core hours" in n for n in result["notes"])


def _check_equal_compute(row, models, steps):
    """The costliest model (training CPU seconds) keeps its steps; the others train longer, in
    proportion to their measured cost per step."""
    costs = {m: row[f"{m}_cpu_s"] for m in models}
    assert all(c > 0 for c in costs.values())
    costliest = max(costs, key=costs.get)
    for m in models:
        ratio = costs[costliest] / costs[m]
        expected = steps if ratio <= 1.05 else round(steps * ratio)
        assert row[f"{m}_steps_equal"] == expected, (m, costs)
        assert _finite(row[f"{m}_nll_equal"])


@pytest.mark.slow
def test_classification_runs_through_the_sweep_with_the_papers_numbers(tmp_path):
    result = _reproduce("classification", tmp_path)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"Vanilla", "c=0.9"}
    assert all(0 <= r["test_error_pct"] <= 100 for r in rows.values())
    assert rows["Vanilla"]["paper_mnist"] == 0.38 and rows["c=0.9"]["paper_cifar10"] == 6.78
    # certified, never below the real norms: a contraction; a little above c^3 where a conv map's bound is
    # the circular-convolution norm (8x8 inputs with many channels: a few % per map)
    assert 0.9 ** 3 * (1 - 1e-6) <= rows["c=0.9"]["lipschitz_max"] < 1.0 < rows["Vanilla"]["lipschitz_max"]
    for folder in result["extra"]["sweeps"].values():  # the real sweep machinery wrote its summary
        assert (Path(folder) / "summary.md").is_file() and list(Path(folder).glob("*/metrics.json"))


@pytest.mark.slow
def test_density_bits_per_dim(tmp_path):
    result = _reproduce("density", tmp_path)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"i-ResNet", "Residual Flow"}
    for r in rows.values():
        assert _finite(r["test_bpd"]) and 0 < r["test_bpd"] < 8 and r["scored_with"] == "exact"
    assert rows["i-ResNet"]["paper_mnist"] == 1.06 and rows["Residual Flow"]["paper_cifar10"] == 3.28
    costs = {name: r["cpu_s"] for name, r in rows.items()}
    costliest = max(costs, key=costs.get)
    for name, r in rows.items():  # the costliest keeps its steps, the others train for its CPU seconds
        ratio = costs[costliest] / costs[name]
        assert r["steps_equal"] == (r["steps"] if ratio <= 1.05 else round(r["steps"] * ratio))
        assert _finite(r["bpd_equal"])
    assert any("CPU-core hours" in n for n in result["notes"])
