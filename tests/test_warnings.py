"""What the warnings policy needs from our code: no deprecated argument reaches torch from our configs.

DDP's ``broadcast_buffers`` is deprecated since torch 2.13 (a FutureWarning at every start) in favour of
``forward_sync_buffers``; the trainer configs use the new name, and either name is passed on under the
one the installed torch takes.
"""

from __future__ import annotations

import inspect

import pytest
from torch.nn.parallel import DistributedDataParallel

from iresflow.config import ConfigError, load_config
from iresflow.run.build import build_strategy, trainer_kwargs

DDP_PARAMETERS = inspect.signature(DistributedDataParallel).parameters
CURRENT = "forward_sync_buffers" if "forward_sync_buffers" in DDP_PARAMETERS else "broadcast_buffers"


@pytest.mark.parametrize("given", ["broadcast_buffers", "forward_sync_buffers"])
def test_buffer_sync_reaches_ddp_under_the_name_torch_takes(given):
    strategy = build_strategy({"name": "ddp", given: False})
    assert strategy._ddp_kwargs == {CURRENT: False}


@pytest.mark.parametrize("trainer", ["ddp", "multinode"])
def test_trainer_configs_pass_no_deprecated_ddp_argument(trainer):
    kwargs = trainer_kwargs(load_config([f"trainer={trainer}", "trainer.accelerator=gpu"]))["strategy"]._ddp_kwargs
    assert kwargs[CURRENT] is True
    if CURRENT == "forward_sync_buffers":
        assert "broadcast_buffers" not in kwargs


def test_both_names_at_once_is_bad_input():
    with pytest.raises(ConfigError, match="forward_sync_buffers only"):
        build_strategy({"name": "ddp", "broadcast_buffers": True, "forward_sync_buffers": True})
