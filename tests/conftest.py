"""Test-wide settings: offline W&B, a headless plotting backend, and one thread
(the suite is sized for 2 CPU cores)."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the suite's tensors are tiny, and on a shared 2-core
# machine a second thread costs far more in synchronisation than it saves
# (measured: 300 power iterations of a small conv, 0.03 s on 1 thread, 1.0 s on 2).
torch.set_num_threads(int(os.environ.get("IRESFLOW_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _plugin_path_env():
    """``registry.discover`` exports the plugin folders it is given to ``$IRESFLOW_PLUGINS`` (for child
    processes); one test's folders must not become the next test's."""
    before = os.environ.get("IRESFLOW_PLUGINS")
    yield
    if before is None:
        os.environ.pop("IRESFLOW_PLUGINS", None)
    else:
        os.environ["IRESFLOW_PLUGINS"] = before


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """The plugin folder of the fault tests' slow toy flow (``run_helpers``)."""
    from run_helpers import write_plugin

    return write_plugin(tmp_path_factory)
