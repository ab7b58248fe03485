"""The plugin registry: lookup, errors that suggest, duplicates, discovery."""

import sys
import textwrap

import pytest

from iresflow import registry
from iresflow.registry import PluginImportError, RegistryError


@pytest.fixture
def scratch_kind():
    """A kind used only by one test, removed afterwards."""
    kind = "test_scratch"
    yield kind
    registry._REGISTRY.pop(kind, None)


def test_builtin_kinds_are_discovered():
    assert {"activation", "residual", "solver", "estimator", "model", "task", "data"} <= set(registry.kinds())
    assert {"elu", "lipswish", "clipswish", "softplus"} <= set(registry.available("activation"))
    assert registry.available("estimator", "russian*") == ["russian_roulette"]


def test_register_build_and_describe(scratch_kind):
    @registry.register(scratch_kind, "affine", description="y = a x + b")
    def affine(a: float = 2.0, b: float = 0.0):
        return lambda x: a * x + b

    assert registry.build(scratch_kind, "affine", a=3.0)(1.0) == 3.0
    assert registry.build_node(scratch_kind, {"name": "affine", "b": 1.0})(1.0) == 3.0
    # defaults fill only parameters the component accepts and the node leaves unset
    assert registry.build_node(scratch_kind, {"name": "affine", "b": 1.0}, a=5.0, unrelated=1)(1.0) == 6.0
    entry = registry.get(scratch_kind, "affine")
    assert entry.description == "y = a x + b"
    assert entry.parameters() == {"a": "2.0", "b": "0.0"}


def test_unknown_name_suggests_close_match():
    with pytest.raises(RegistryError) as err:
        registry.build("activation", "lipswhish")
    msg = str(err.value)
    assert "Did you mean 'lipswish'" in msg
    assert "elu" in msg  # the available names are listed


def test_unknown_kind_suggests():
    with pytest.raises(RegistryError, match="Did you mean 'solver'"):
        registry.available("solvers")


def test_unknown_parameter_names_accepted_ones(scratch_kind):
    @registry.register(scratch_kind, "thing")
    class Thing:
        def __init__(self, width: int = 4):
            self.width = width

    with pytest.raises(RegistryError) as err:
        registry.build(scratch_kind, "thing", widht=3)
    assert "did you mean 'width'" in str(err.value)
    assert "Accepted: width" in str(err.value)


def test_duplicate_name_is_refused_unless_override(scratch_kind):
    @registry.register(scratch_kind, "dup")
    class A:
        pass

    with pytest.raises(RegistryError, match="already registered"):

        @registry.register(scratch_kind, "dup")
        class B:
            pass

    @registry.register(scratch_kind, "dup", override=True)
    class C:
        pass

    assert isinstance(registry.build(scratch_kind, "dup"), C)


def test_example_plugin_in_registry_folder_is_found_and_works():
    import torch

    assert "groupsort" in registry.available("activation")
    act = registry.build("activation", "groupsort", group_size=2)
    x = torch.tensor([[3.0, 1.0, -1.0, 2.0]])
    assert torch.equal(act(x), torch.tensor([[1.0, 3.0, -1.0, 2.0]]))
    # 1-Lipschitz: a permutation per sample keeps distances from growing
    a, b = torch.randn(64, 8), torch.randn(64, 8)
    assert ((act(a) - act(b)).norm(dim=1) <= (a - b).norm(dim=1) + 1e-6).all()


def test_plugin_folder_from_environment(tmp_path, monkeypatch, scratch_kind):
    (tmp_path / "myplugin.py").write_text(textwrap.dedent(f"""
        from iresflow.registry import register
        @register("{scratch_kind}", "from_env_folder")
        class X:
            pass
    """))
    monkeypatch.setenv(registry.PLUGIN_PATH_ENV, str(tmp_path))
    registry.discover()
    assert registry.available(scratch_kind) == ["from_env_folder"]


def test_plugin_that_fails_to_import_is_reported_by_name(tmp_path):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(PluginImportError) as err:
        registry.discover([tmp_path])
    assert "broken_plugin.py" in str(err.value)
    assert "not_a_module_anywhere" in str(err.value)


def test_missing_explicit_plugin_folder_is_an_error(tmp_path):
    with pytest.raises(PluginImportError, match="does not exist"):
        registry.discover([tmp_path / "nope"])


def test_entry_point_plugin_is_found(tmp_path, monkeypatch, scratch_kind):
    # A minimal installed distribution: a package plus dist-info with entry_points.txt.
    pkg = tmp_path / "iresflow_ep_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        from iresflow.registry import register
        @register("{scratch_kind}", "from_entry_point")
        def make():
            return 42
    """))
    info = tmp_path / "iresflow_ep_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: iresflow-ep-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[iresflow.plugins]\ndemo = iresflow_ep_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.discover()
    assert registry.build(scratch_kind, "from_entry_point") == 42
    sys.modules.pop("iresflow_ep_demo", None)


def test_nested_nodes_become_factories_and_every_block_gets_its_own_instance():
    """Names are resolved once, by the registry: the model receives factories and builds a
    fresh estimator and solver per block (nn/ code never looks a name up)."""
    flow = registry.build("model", "iresnet_flow", in_shape=(2,), n_blocks=3, hidden=[8],
                          estimator={"name": "power_series", "n_terms": 4},
                          solver={"name": "anderson", "memory": 2}, activation="elu")
    blocks = flow.blocks
    assert len({id(b.estimator) for b in blocks}) == 3 and len({id(b.solver) for b in blocks}) == 3
    assert all(b.estimator.n_terms == 4 and b.solver.memory == 2 for b in blocks)
    assert all(type(m).__name__ == "ELU" for b in blocks for m in b.g.net if not hasattr(m, "weight"))


def test_factory_checks_names_and_parameters_when_made():
    f = registry.factory("estimator", {"name": "power_series", "n_terms": 3})
    assert f().n_terms == 3 and f() is not f()
    assert f.node() == {"name": "power_series", "n_terms": 3}
    with pytest.raises(RegistryError, match="Did you mean 'power_series'"):
        registry.factory("estimator", "power_serie")
    with pytest.raises(RegistryError, match="did you mean 'n_terms'"):
        registry.factory("estimator", {"name": "power_series", "n_term": 3})


def test_instance_refuses_unresolved_names_and_copies_objects():
    from iresflow.nn.logdet import ExactLogDet

    with pytest.raises(TypeError, match="registry.build"):
        registry.instance("exact")
    est = ExactLogDet()
    copy = registry.instance(est)
    assert isinstance(copy, ExactLogDet) and copy is not est


def test_only_part_kinds_are_resolved_from_parameter_names():
    """``task="density"`` of a datamodule is a plain string, not a task component."""
    assert registry.kind_of_parameter("eval_estimator") == "estimator"
    assert registry.kind_of_parameter("task") is None and registry.kind_of_parameter("model") is None
    dm = registry.build("data", "fake", task="density")
    assert dm.task == "density"


def test_parameters_passed_on_by_kwargs_are_checked_against_the_base():
    """A task takes the shared settings as ``**common``: the registry still knows them all,
    so a typo in one is refused with the close match, and a real one is accepted."""
    params, open_ = registry.accepted_parameters(registry.get("task", "density").obj)
    assert not open_ and {"eval_estimator", "lipschitz_iterations", "optimizer", "model"} <= set(params)
    with pytest.raises(RegistryError, match="did you mean 'lipschitz_iterations'"):
        registry.factory("task", {"name": "density", "lipschitz_iteration": 2})
    assert "max_consecutive_skips" in registry.get("task", "classification").parameters()
