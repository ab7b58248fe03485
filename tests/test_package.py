"""iresflow as a real package: the shipped configs and example plugins, their override, and plugins
that survive a spawned process.

The slow test builds the wheel, installs it (not editable) into a fresh virtual environment and trains
from a folder outside the checkout; the dependencies come from this environment's site-packages through
a ``.pth`` line (a directory added so does not run the ``.pth`` files inside it, so the editable install
there stays invisible).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

from iresflow.config import config_dir, init_config_dir, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGINS = {"activation": ["groupsort", "tanh"], "normalization": ["frobenius"], "prior": ["logistic"]}


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1"}
    for var in ("IRESFLOW_CONFIG_DIR", "IRESFLOW_PLUGINS", "IRESFLOW_DEBUG", "IRESFLOW_RUN_DIR", "IRESFLOW_RESUME"):
        env.pop(var, None)
    return {**env, **extra}


def _tiny_run(out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", "logger=csv", "trainer=cpu", "trainer.max_steps=5", "trainer.max_epochs=1",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "data.batch_size=50", "data.train_size=250", "data.val_size=50", "data.test_size=50",
            "task.n_samples=50", "model.n_blocks=2", "model.hidden=[8]", *extra]


# --------------------------------------------------------------------------- the package's contents

def test_pyproject_lists_every_package():
    """The package list is explicit (two packages live outside iresflow/): it must name every one."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "iresflow").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"iresflow._configs", "iresflow._plugins"}
    assert setuptools["package-dir"] == {"iresflow._configs": "configs", "iresflow._plugins": "registry"}
    # every config file is matched by a package-data pattern (no deeper folders than they reach)
    for file in (ROOT / "configs").rglob("*"):
        if file.is_file() and file.suffix in (".yaml", ".md"):
            assert len(file.relative_to(ROOT / "configs").parts) <= 2, file


def test_config_init_copies_and_keeps_existing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("IRESFLOW_CONFIG_DIR", raising=False)
    shipped = config_dir()
    target = tmp_path / "myconfigs"
    target.mkdir()
    (target / "train.yaml").write_text("# mine\n")
    copied, kept = init_config_dir(target)
    assert kept == [target / "train.yaml"] and (target / "train.yaml").read_text() == "# mine\n"
    expected = {p.relative_to(shipped) for p in shipped.rglob("*") if p.suffix in (".yaml", ".md")}
    assert {p.relative_to(target) for p in copied} == expected - {Path("train.yaml")}
    assert (target / "model" / "flow_fc.yaml").read_text() == (shipped / "model" / "flow_fc.yaml").read_text()
    assert not (target / "__init__.py").exists()
    copied, kept = init_config_dir(target, force=True)
    assert (target / "train.yaml").read_text() == (shipped / "train.yaml").read_text() and not kept
    # the copy is what a run reads once pointed at it
    (target / "model" / "flow_fc.yaml").write_text((shipped / "model" / "flow_fc.yaml").read_text()
                                                   .replace("coeff: 0.97", "coeff: 0.77"))
    monkeypatch.setenv("IRESFLOW_CONFIG_DIR", str(target))
    assert load_config([]).model.coeff == 0.77


def test_config_dir_option_reaches_the_run(tmp_path):
    """``iresflow --config-dir DIR`` reads DIR (a real process; the default run's model changed there)."""
    subprocess.run([sys.executable, "-m", "iresflow", "config", "init", str(tmp_path / "c")], cwd=tmp_path,
                   env=_env(PYTHONPATH=str(ROOT)), check=True, capture_output=True)
    flow = tmp_path / "c" / "model" / "flow_fc.yaml"
    flow.write_text(flow.read_text().replace("coeff: 0.97", "coeff: 0.66"))
    proc = subprocess.run([sys.executable, "-m", "iresflow", "--config-dir", str(tmp_path / "c"), "config", "show"],
                          cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "coeff: 0.66" in proc.stdout
    missing = subprocess.run([sys.executable, "-m", "iresflow", "--config-dir", str(tmp_path / "nothing"), "train"],
                             cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert missing.returncode == 2 and "config init" in missing.stderr and len(missing.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- plugins in spawned processes

SPAWN_PRIOR = textwrap.dedent('''
    import os

    from iresflow.models.priors import StandardNormalPrior
    from iresflow.registry import register


    @register("prior", "test_spawn_prior", description="test: N(0, I) that notes the process using it")
    class PidPrior(StandardNormalPrior):
        def __init__(self, num_dims, pid_file):
            super().__init__(num_dims)
            self.pid_file = pid_file

        def log_prob(self, z):
            with open(self.pid_file, "a") as f:
                f.write(f"{os.getpid()}\\n")
            return super().log_prob(z)
''')


@pytest.mark.slow
def test_plugins_survive_ddp_spawn(tmp_path):
    """2 CPU processes started with ``spawn`` unpickle a model made of plugin components: the example
    activation of registry/ and a prior from an IRESFLOW_PLUGINS folder. The prior notes every process
    that evaluates it: both spawned workers must have."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "spawn_prior.py").write_text(SPAWN_PRIOR)
    pid_file = tmp_path / "pids.txt"
    args = _tiny_run(tmp_path / "run", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn",
                     "model.activation=groupsort", f"model.prior={{name: test_spawn_prior, pid_file: {pid_file}}}")
    proc = subprocess.Popen([sys.executable, "-m", "iresflow", "train", *args], cwd=tmp_path,
                            env=_env(PYTHONPATH=str(ROOT), IRESFLOW_PLUGINS=str(plugins)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    workers = set(pid_file.read_text().split()) - {str(proc.pid)}
    assert len(workers) >= 2, (workers, proc.pid)
    assert "activation: groupsort" in (tmp_path / "run" / "config.yaml").read_text()


# --------------------------------------------------------------------------- the wheel

def _copy_sources(dest: Path) -> Path:
    """The files a build reads, copied so that building leaves no build/ or egg-info in the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("iresflow", "configs", "registry"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    start = time.monotonic()
    source = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(source)], check=True, capture_output=True, env=_env())
    wheel, = dist.glob("iresflow-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "iresflow/_configs/train.yaml" in names and "iresflow/_configs/model/flow_fc.yaml" in names
    assert {f"iresflow/_plugins/{p}.py" for p in ("groupsort", "tanh", "frobenius", "logistic_prior")} <= names
    assert "iresflow/_plugins/README.md" in names and "iresflow/run/commands.py" in names
    built = time.monotonic()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=_env())
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, env=_env())
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies (torch, lightning, ...) from this environment, added after the install so pip never sees
    # (and never touches) the editable iresflow there
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    installed = time.monotonic()

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _env()
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(python), "-c", "import iresflow, iresflow.resources as r; print(iresflow.__file__); "
                                               "print(r.shipped_configs()); print(r.shipped_plugins())"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    listing = subprocess.run([str(venv / "bin" / "iresflow"), "registry", "list"], cwd=work, env=env,
                             capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    for kind, names in EXAMPLE_PLUGINS.items():
        section = listing.stdout.split(f"[{kind}]")[1].split("\n[")[0]
        assert all(f"  {n} " in section for n in names), (kind, section)
    train = subprocess.run([str(venv / "bin" / "iresflow"), "train", *_tiny_run(work / "run",
                            "model.activation=groupsort")], cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert (work / "run" / "metrics.json").is_file() and (work / "run" / "checkpoints" / "last.ckpt").is_file()
    done = time.monotonic()
    print(f"\nwheel: build {built - start:.1f} s, venv + install {installed - built:.1f} s, "
          f"registry list + train {done - installed:.1f} s")
