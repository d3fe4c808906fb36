"""Train both tiny models with DDP on 2 CPU processes (gloo) and save every rank's quantizer state
after every step. Lightning re-runs this script for rank 1.

Usage: python ddp.py OUT_DIR   (see tests/test_lightning_ddp.py)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning_models import MODELS, quantizer_state, trainer

from qat.lightning import QuantizationAwareTraining

SCHEDULE = {"calibrate_from": 1, "fake_quant_from": 2, "freeze_bn_at": 4}


class StateRecorder(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(quantizer_state(pl_module))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for kind, (module_cls, recipe) in MODELS.items():
        pl.seed_everything(0, verbose=False)
        recorder = StateRecorder()
        # the learnable scale gets no gradient while fake-quant is off: DDP must allow unused parameters
        fit = trainer(strategy="ddp_find_unused_parameters_true", devices=2, max_steps=6, limit_val_batches=1,
                      callbacks=[QuantizationAwareTraining(recipe, schedule=SCHEDULE, print_summary=False), recorder])
        fit.fit(module_cls())
        torch.save(recorder.steps, out / f"{kind}-rank{fit.global_rank}.pt")
