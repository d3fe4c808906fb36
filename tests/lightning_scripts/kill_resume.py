"""Train on shuffled digits and SIGKILL the process mid-epoch, or resume such a run to its end.

Usage: python kill_resume.py kill LOADER CHECKPOINT_DIR   (checkpoints every 2 steps, killed at step 7)
       python kill_resume.py resume LOADER CHECKPOINT OUT  (LOADER: datamodule | plain; see tests/test_lightning_resume.py)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_lightning_resume import CHECKPOINT_EVERY, KILL_AT, run_digits


class KillAt(Callback):
    """SIGKILL, as the OOM killer or a preempted node would: no hook, no ``finally`` runs."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode, loader, path = sys.argv[1:4]
    if mode == "kill":
        saver = ModelCheckpoint(dirpath=path, filename="{step}", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)
        run_digits(loader, callbacks=[saver, KillAt()])
        sys.exit("the run was not killed")
    model, trainer = run_digits(loader, ckpt_path=path)
    torch.save({"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(), "step": trainer.global_step},
               sys.argv[4])
