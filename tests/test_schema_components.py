"""Which config keys take components comes from the registry's kinds; a bug in a component is not bad input.

A key named after a part kind (``model.activation``) takes a name, a node or, for a component given by
its name only, ``model.activation.<param>=...`` (the node is made ``{name: ..., param: ...}``). Both
command-line forms must reach the built activation. A mistyped key is still answered in one line, exit 2,
before torch is imported; a ``TypeError`` raised inside a constructor shows its traceback (exit 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from iresflow import schema
from iresflow.config import ConfigError, load_config
from iresflow.nn.activations import LipSwish
from iresflow.run.build import build_components

ROOT = Path(__file__).resolve().parent.parent
TOY = ["logger=none", "data.train_size=100", "data.val_size=50", "data.test_size=50", "model.n_blocks=1",
       "model.hidden=[8]"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT)}
    for var in ("IRESFLOW_DEBUG", "IRESFLOW_PLUGINS", "IRESFLOW_CONFIG_DIR"):
        env.pop(var, None)
    return {**env, **extra}


def test_component_keys_come_from_the_registry_kinds():
    assert schema.component_kind("model.activation") == "activation"
    assert schema.component_kind("task.eval_estimator") == "estimator"
    assert schema.component_kind("model.estimator.trace") == "trace"
    assert schema.component_kind("model.fc_residual") == "residual"
    assert schema.component_kind("model.coeff") is None and schema.component_kind("trainer.strategy") is None
    assert "dict" in schema.accepts_for("model.activation", "lipswish", has_default=True).kinds
    # null: the component's own default (the flow's standard prior, its residual block, ...)
    assert "null" in schema.accepts_for("model.prior", "standard", has_default=True).kinds
    with pytest.raises(ValueError, match="model.activation takes text, a mapping"):
        schema.check_value("model.activation", True, schema.accepts_for("model.activation", "elu", True))
    assert load_config([*TOY, "task.eval_estimator={name: exact}"]).task.eval_estimator.name == "exact"
    assert load_config([*TOY, "model.prior=null"]).model.prior is None


@pytest.mark.parametrize("overrides", [
    ["model.activation={name: lipswish, beta: 2.0}"],
    ["model.activation.name=lipswish", "model.activation.beta=2.0"],
    ["model.activation.beta=2.0"],
    ["model.activation=elu", "model.activation.name=lipswish", "model.activation.beta=2"],
], ids=["node", "name-and-param", "param-only", "switch-then-param"])
def test_both_command_line_forms_reach_the_built_activation(overrides):
    cfg = load_config([*TOY, *overrides])
    assert dict(cfg.model.activation) == {"name": "lipswish", "beta": 2.0}
    _, model, _ = build_components(cfg)
    found = [m for m in model.modules() if isinstance(m, LipSwish)]
    assert found
    x = torch.linspace(-4, 4, 17, dtype=torch.float64)
    for act in found:
        assert float(act.beta.detach()) == pytest.approx(2.0, rel=1e-6)
        # the formula with beta = 2, against the module (float32 parameters)
        assert torch.allclose(act(x.float()).double(), x * torch.sigmoid(2.0 * x) / 1.1, atol=1e-6)


def test_an_unknown_component_parameter_names_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"no parameter 'betta'.*Did you mean 'beta'"):
        load_config([*TOY, "model.activation.betta=2.0"])


def test_a_key_typo_is_one_line_exit_2_before_torch_is_imported():
    code = textwrap.dedent('''
        import sys
        from iresflow.run.commands import main
        code = main(["config", "show", "model.activaton.name=lipswish"])
        print("exit", code, "torch imported:", "torch" in sys.modules)
    ''')
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "exit 2 torch imported: False", proc.stdout + proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "model.activation" in proc.stderr


BUGGY_PLUGIN = textwrap.dedent('''
    from iresflow.nn.activations import ElementwiseActivation
    from iresflow.registry import register


    @register("activation", "test_buggy_act", description="test: a constructor with a bug")
    class BuggyActivation(ElementwiseActivation):
        lipschitz = 1.0

        def __init__(self, slope: float = 0.5, bug: bool = False):
            super().__init__()
            if not 0 < slope <= 1:
                raise ValueError(f"slope must be in (0, 1], got {slope}")
            self.slope = slope
            if bug:
                len(slope)  # a bug: TypeError: object of type 'float' has no len()

        def f(self, x):
            return self.slope * x

        def df(self, x):
            return self.slope + 0 * x

        def d2f(self, x):
            return 0 * x
''')


@pytest.mark.parametrize("node, code, traceback", [
    ("{name: test_buggy_act, slope: 2.0}", 2, False),
    ("{name: test_buggy_act, bug: true}", 1, True),
], ids=["bad-value", "bug"])
def test_a_bug_in_a_constructor_is_not_bad_input(tmp_path, node, code, traceback):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "buggy.py").write_text(BUGGY_PLUGIN)
    proc = subprocess.run([sys.executable, "-m", "iresflow", "train", *TOY, f"output_dir={tmp_path / 'run'}",
                           f"model.activation={node}"], cwd=tmp_path, env=_env(IRESFLOW_PLUGINS=str(plugins)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    assert ("Traceback" in proc.stderr) == traceback, proc.stderr
    if traceback:
        assert "has no len()" in proc.stderr and "buggy.py" in proc.stderr
    else:
        assert proc.stderr.count("\n") == 1 and "slope must be in (0, 1]" in proc.stderr
