"""Resuming a QAT run from a checkpoint in a new process reaches, bit for bit, the state of the
run that was never interrupted: weights, scales, zero points, observer ranges, optimizer state —
from an end-of-epoch checkpoint, and from a mid-epoch one of a run killed with SIGKILL when the
training data comes from a shipped DataModule (a plain shuffled DataLoader does not resume)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning_models import CNN_RECIPE, MODELS, DigitsClassifier, trainer
from torch.utils.data import DataLoader

from qat.app.data import DigitsDataModule
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


# --- a run killed mid-epoch (SIGKILL) and resumed from its last checkpoint ------------------------

KILL_SCHEDULE = {"calibrate_from": 2, "fake_quant_from": 3, "freeze_bn_at": 8, "freeze_observers_at": 10}
"""Both freezes fall after the checkpoints the tests resume from."""
CHECKPOINT_EVERY, KILL_AT = 2, 7
"""Checkpoints at steps 2, 4 (the end of epoch 0) and 6 (half-way through epoch 1), then SIGKILL at step 7."""


class PlainDigits(DigitsDataModule):
    """The same data through a plain shuffled DataLoader (a seeded generator): what a user's own loader is."""

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))


def run_digits(loader: str, callbacks: list[pl.Callback] | tuple = (), ckpt_path: str | None = None
               ) -> tuple[pl.LightningModule, pl.Trainer]:
    """A seeded, deterministic QAT fit on shuffled digits: 180 training images in batches of 48 (4 steps
    an epoch, the last batch partial), 3 epochs."""
    pl.seed_everything(0, verbose=False)
    torch.use_deterministic_algorithms(True)
    data = (DigitsDataModule if loader == "datamodule" else PlainDigits)(
        batch_size=48, channels=3, fractions=(0.1, 0.05, 0.85), seed=3)
    model = DigitsClassifier()
    fit = trainer(max_epochs=3, limit_val_batches=1, enable_checkpointing=bool(callbacks),
                  callbacks=[QuantizationAwareTraining(CNN_RECIPE, schedule=KILL_SCHEDULE, print_summary=False), *callbacks])
    fit.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, fit


def _kill_and_resume(loader: str, tmp_path: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The uninterrupted run's final state, and that of the killed run resumed from each of its checkpoints."""
    model, fit = run_digits(loader)
    assert fit.global_step == 12 and fit.num_training_batches == 4
    uninterrupted = {"model": model.state_dict(), "optimizer": fit.optimizers[0].state_dict()}

    script = Path(__file__).parent / "lightning_scripts" / "kill_resume.py"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    killed = subprocess.run([sys.executable, str(script), "kill", loader, str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    resumed = {}
    for step in (4, 6):
        out = tmp_path / f"resumed-{step}.pt"
        done = subprocess.run([sys.executable, str(script), "resume", loader, str(tmp_path / f"step={step}.ckpt"), str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        resumed[step] = torch.load(out, weights_only=True)
        assert resumed[step]["step"] == 12
    return uninterrupted, resumed


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    uninterrupted, resumed = _kill_and_resume("datamodule", tmp_path)
    saved = torch.load(tmp_path / "step=6.ckpt", weights_only=True)
    assert saved["qat"]["phase"] == "qat" and saved["epoch"] == 1  # half-way through epoch 1, in QAT
    for step in (4, 6):  # the end of epoch 0, the middle of epoch 1
        _equal(uninterrupted["model"], resumed[step]["model"], f"model from step {step}")
        _equal(uninterrupted["optimizer"], resumed[step]["optimizer"], f"optimizer from step {step}")


@pytest.mark.slow
def test_a_plain_shuffled_dataloader_does_not_resume_bit_for_bit(tmp_path):
    """Lightning restarts a loader without ``state_dict`` at the start of its order: from a mid-epoch
    checkpoint it trains on batches already seen, and a seeded shuffle replays epoch 0's order after
    any resume, so even the end-of-epoch checkpoint diverges."""
    uninterrupted, resumed = _kill_and_resume("plain", tmp_path)
    for step in (4, 6):
        weights = uninterrupted["model"]["model.fc2.weight"]
        assert not torch.equal(weights, resumed[step]["model"]["model.fc2.weight"]), f"step {step}"
