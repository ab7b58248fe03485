"""Two nodes on one machine: ``torchrun --nnodes=2`` as two launcher processes (node ranks 0 and 1,
rendezvous on 127.0.0.1, gloo), Lightning's DDP with ``num_nodes=2``, against one process trained on
the global batch (the same float64 setting as tests/test_ddp.py: measured differences ~1e-16)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_ddp import STEPS, TOL, _diffs, _fit, _load

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun launchers, each starting one training process: ~40 s
def test_two_nodes_equal_one_process_on_the_global_batch(tmp_path):
    port = _free_port()
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SLURM_JOB_ID",
                "SLURM_NTASKS"):
        env.pop(var, None)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
                               str(HERE / "multinode_worker.py"), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    _fit(1, tmp_path, "single", STEPS)
    single = _load(tmp_path, "single_rank0")
    worst = 0.0
    for rank in (0, 1):
        diffs = _diffs(_load(tmp_path, f"two_nodes_rank{rank}"), single)
        worst = max(worst, max(diffs.values()))
        assert max(diffs.values()) <= TOL, list(diffs.items())[:3]
    rank0, rank1 = _load(tmp_path, "two_nodes_rank0"), _load(tmp_path, "two_nodes_rank1")
    vectors = [k for k in rank0 if k.endswith((".u", ".v", ".sigma"))]
    assert vectors and all(torch.equal(rank0[k], rank1[k]) for k in vectors)  # the nodes' buffers agree exactly
    print(f"\n[multinode] 2 nodes x 1 process vs 1 process on the global batch: max |difference| = {worst:.2e}")
