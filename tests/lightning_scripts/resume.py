"""Resume a QAT run from a checkpoint in a fresh process and save where it ends.

Usage: python resume.py KIND CHECKPOINT OUT   (KIND: cnn | llama; see tests/test_lightning_resume.py)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from test_lightning_resume import SCHEDULE, run

if __name__ == "__main__":
    kind, checkpoint, out = sys.argv[1:]
    model, trainer = run(kind, epochs=3, ckpt_path=checkpoint)
    torch.save({"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(), "schedule": SCHEDULE}, out)
