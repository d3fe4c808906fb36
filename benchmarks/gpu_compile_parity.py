"""Diagnostic: losses of eager vs Inductor-compiled training, float and QAT, with and without
Lightning, for the tiny CNN (12 steps, fp32). Usage: python benchmarks/gpu_compile_parity.py [cuda|cpu]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lightning.pytorch as pl
import torch
from lightning_models import CNN_RECIPE, LitClassifier, MemoryLogger
from torch import nn

import qat
from qat.lightning import QuantizationAwareTraining

SCHEDULE = {"fake_quant_from": 1}
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def lightning_losses(quantized: bool, compiled: bool) -> list[float]:
    pl.seed_everything(0, verbose=False)
    model, logger = LitClassifier(), MemoryLogger()
    callbacks = [QuantizationAwareTraining(CNN_RECIPE, schedule=SCHEDULE, print_summary=False)] if quantized else []
    pl.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, max_steps=12, max_epochs=None, logger=logger,
               log_every_n_steps=1,
               limit_val_batches=0, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
               callbacks=callbacks).fit(torch.compile(model) if compiled else model)
    return [round(v, 3) for _, v in logger.history["train_loss"]]


def plain_losses(compiled: bool) -> list[float]:
    pl.seed_everything(0, verbose=False)
    module = LitClassifier()
    data = [(x.to(DEVICE), y.to(DEVICE)) for x, y in module.train_dataloader()]
    model = qat.prepare(module, CNN_RECIPE, example_inputs=data[0][0].cpu()).to(DEVICE)
    schedule = qat.QATSchedule.coerce(SCHEDULE)
    optimizer = torch.optim.SGD(model.parameters(), lr=module.lr, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    losses = []
    for step in range(12):
        x, y = data[step % len(data)]
        schedule.apply(model, step)
        loss = nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 3))
    return losses


if __name__ == "__main__":
    print("torch", torch.__version__, torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    only = sys.argv[2:]  # optional: names of the runs to do
    for name, fn in [("lightning float eager", lambda: lightning_losses(False, False)),
                     ("lightning float compiled", lambda: lightning_losses(False, True)),
                     ("lightning qat eager", lambda: lightning_losses(True, False)),
                     ("lightning qat compiled", lambda: lightning_losses(True, True)),
                     ("plain qat eager", lambda: plain_losses(False)),
                     ("plain qat compiled", lambda: plain_losses(True))]:
        if only and name not in only:
            continue
        torch._dynamo.reset()
        try:
            print(f"{name:26}", fn(), flush=True)
        except Exception as error:  # a diagnostic: report and go on
            print(f"{name:26} FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)
