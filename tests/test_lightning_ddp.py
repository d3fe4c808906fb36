"""DDP on 2 CPU processes (gloo): every rank holds the same scales, zero points and observer
ranges after every step, although each rank sees different data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_ddp_ranks_hold_identical_quantizer_state(tmp_path):
    script = Path(__file__).parent / "lightning_scripts" / "ddp.py"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in ("cnn", "llama"):
        rank0 = torch.load(tmp_path / f"{kind}-rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{kind}-rank1.pt", weights_only=True)
        assert len(rank0) == len(rank1) == 6
        for step, (a, b) in enumerate(zip(rank0, rank1, strict=True)):
            assert a.keys() == b.keys() and a
            for key in a:
                assert torch.equal(a[key], b[key]), f"{kind} step {step}: {key} differs between ranks"
        scales = [k for k in rank0[-1] if k.endswith("input_quantizer.scale")]
        if kind == "cnn":  # the activation ranges were observed (all-reduced), not left at their initial value
            assert scales and all(not torch.equal(rank0[-1][k], torch.ones_like(rank0[-1][k])) for k in scales)
