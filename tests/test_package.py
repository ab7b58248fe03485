"""iresflow as users install it: a wheel, installed non-editable into a fresh virtual environment.

The wheel must carry the configs, the example plugins and the sweep specs (package data, found through
importlib.resources), so that the README's commands run from any folder; and a plugin component must
survive a spawned process (its module has a stable, importable name).

The fresh environment gets the project environment's dependencies through a ``.pth`` line (no 5 GB
reinstall of torch); a ``.pth`` line adds a folder to ``sys.path`` without running the ``.pth`` files
in it, so the project's editable install stays invisible there, which the test checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_in_the_wheel_list():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "iresflow").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IRESFLOW_CONFIG_DIR", "IRESFLOW_PLUGINS")}
    return {**env, "WANDB_MODE": "offline", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel built from this checkout installed in it (its bin/)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy of what the wheel is made of: the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "iresflow", "configs", "registry", "sweeps"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(source)], check=True, capture_output=True, env=_env())
    (wheel,) = (tmp / "dist").glob("iresflow-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_env())
    bin_dir = venv / "bin"
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(bin_dir / "python"), "-c", ask], check=True, capture_output=True,
                             text=True).stdout.strip()
    (Path(purelib) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, env=_env())
    return bin_dir


def _run(bin_dir: Path, args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # builds and installs a wheel, then trains: ~40 s
def test_the_installed_wheel_trains_from_any_folder(installed, tmp_path):
    where = _run(installed, ["python", "-c", "import iresflow; print(iresflow.__file__)"], tmp_path)
    assert where.returncode == 0 and where.stdout.startswith(str(installed.parent)), where.stdout + where.stderr
    out = tmp_path / "run"
    done = _run(installed, ["iresflow", "train", "trainer.max_steps=5", "model.n_blocks=2", "model.hidden=[16]",
                            "data.train_size=500", "data.val_size=100", "data.test_size=100", "task.n_samples=100",
                            "logger=none", "trainer.enable_progress_bar=false", f"output_dir={out}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "metrics.json").is_file() and (out / "density.png").is_file()
    listing = _run(installed, ["iresflow", "registry", "list", "activation"], tmp_path)
    assert listing.returncode == 0 and "tanh" in listing.stdout and "groupsort" in listing.stdout  # shipped plugins
    made = _run(installed, ["iresflow", "config", "init", str(tmp_path / "cfg")], tmp_path)
    assert made.returncode == 0 and (tmp_path / "cfg" / "train.yaml").is_file()
    (tmp_path / "cfg" / "model" / "flow_fc.yaml").write_text(
        (tmp_path / "cfg" / "model" / "flow_fc.yaml").read_text().replace("coeff: 0.97", "coeff: 0.55"))
    shown = _run(installed, ["iresflow", "--config-dir", str(tmp_path / "cfg"), "config", "show"], tmp_path)
    assert shown.returncode == 0 and "coeff: 0.55" in shown.stdout
    dry = _run(installed, ["iresflow", "sweep", "coeff", "--dry-run"], tmp_path)  # a shipped sweep spec, by name
    assert dry.returncode == 0, dry.stderr[-2000:]


@pytest.mark.slow  # two spawned DDP processes: ~30 s
def test_a_plugin_component_survives_spawned_ddp_processes(installed, tmp_path):
    """``ddp_spawn`` pickles the model into new processes: the plugin activation (the shipped ``tanh``
    example, and one from a folder of the user's) must be importable there by its module name."""
    mine = tmp_path / "plugins"
    mine.mkdir()
    (mine / "my_softsign.py").write_text(
        "import torch\n"
        "from iresflow.nn.activations import ElementwiseActivation\n"
        "from iresflow.registry import register\n\n\n"
        "@register('activation', 'my_softsign', description='test: softsign, 1-Lipschitz')\n"
        "class MySoftsign(ElementwiseActivation):\n"
        "    lipschitz = 1.0\n\n"
        "    def f(self, x):\n        return x / (1 + x.abs())\n\n"
        "    def df(self, x):\n        return 1 / (1 + x.abs()) ** 2\n\n"
        "    def d2f(self, x):\n        return -2 * torch.sign(x) / (1 + x.abs()) ** 3\n")
    for activation in ("tanh", "my_softsign"):
        out = tmp_path / activation
        done = _run(installed, ["iresflow", "train", f"plugins=[{mine}]", f"model.activation={activation}",
                                "trainer.strategy=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2",
                                "trainer.max_steps=3", "model.n_blocks=1", "model.hidden=[8]", "data.train_size=200",
                                "data.val_size=50", "data.test_size=50", "task.n_samples=50", "logger=none",
                                "trainer.enable_progress_bar=false", f"output_dir={out}"], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "metrics.json").is_file()
