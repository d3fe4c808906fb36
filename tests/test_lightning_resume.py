"""Resuming a QAT run from a checkpoint in a new process reaches, bit for bit, the state of the
run that was never interrupted: weights, scales, zero points, observer ranges, optimizer state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning_models import MODELS, trainer

from qat.lightning import QuantizationAwareTraining

SCHEDULE = {"calibrate_from": 2, "fake_quant_from": 3, "freeze_bn_at": 6, "freeze_observers_at": 9}
"""In optimizer steps; 4 steps per epoch: the checkpoint (end of epoch 1, step 4) falls in QAT, and
both freezes happen after the resume."""


def run(kind: str, epochs: int, ckpt_path: str | None = None) -> tuple[pl.LightningModule, pl.Trainer]:
    """The same seeded, deterministic run for the uninterrupted, first-half and resumed parts."""
    pl.seed_everything(0, verbose=False)
    torch.use_deterministic_algorithms(True)
    module_cls, recipe = MODELS[kind]
    model = module_cls()
    fit = trainer(max_epochs=epochs, limit_val_batches=1,
                  callbacks=[QuantizationAwareTraining(recipe, schedule=SCHEDULE, print_summary=False)])
    fit.fit(model, ckpt_path=ckpt_path)
    return model, fit


def _equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "llama"])
def test_resume_in_a_new_process_is_bit_identical(kind, tmp_path):
    model, fit = run(kind, epochs=3)
    uninterrupted = {"model": model.state_dict(), "optimizer": fit.optimizers[0].state_dict()}
    assert any("freeze" in k for k in SCHEDULE) and fit.global_step == 12

    _, first = run(kind, epochs=1)
    checkpoint = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["qat"]["phase"] == "qat" and saved["global_step"] == 4
    assert any(k.endswith("weight_quantizer.scale") for k in saved["state_dict"])

    out = tmp_path / "resumed.pt"
    script = Path(__file__).parent / "lightning_scripts" / "resume.py"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run([sys.executable, str(script), kind, str(checkpoint), str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(out, weights_only=True)
    _equal(uninterrupted["model"], resumed["model"], "model")
    _equal(uninterrupted["optimizer"], resumed["optimizer"], "optimizer")
    # the resumed run went through the freezes: observers off, BatchNorm statistics frozen
    layer = "model.fc1" if kind == "cnn" else "model.model.layers.0.self_attn.q_proj"
    assert resumed["model"][f"{layer}.weight_quantizer._extra_state"] == {"observer_enabled": False, "fake_quant_enabled": True}
    if kind == "cnn":
        assert resumed["model"]["model.conv1._extra_state"] == {"bn_frozen": True}
