"""One node of the two-node test (tests/test_multinode.py), started by ``torchrun --nnodes=2``.

The test_ddp pieces (float64 toy flow, exact log-det, SGD with momentum, one fixed global batch cut
into the ranks' shares) trained by Lightning's DDP across ``num_nodes=2`` nodes of one process each;
every rank dumps its final state. Not a test module itself (no ``test_`` prefix).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from test_ddp import STEPS, _ddp_strategy, _FixedBatch, _task


def main(out: str) -> None:
    torch.set_num_threads(1)
    task = _task(Path(out), "two_nodes")
    trainer = pl.Trainer(max_steps=STEPS, precision="64-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out,
                         accelerator="cpu", devices=1, num_nodes=2, strategy=_ddp_strategy())
    trainer.fit(task, datamodule=_FixedBatch())
    assert trainer.world_size == 2 and trainer.num_nodes == 2


if __name__ == "__main__":
    main(sys.argv[1])
