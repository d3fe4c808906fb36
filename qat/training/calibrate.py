"""Post-training quantization: calibrate a prepared model's ranges on a few batches.

::

    model = qat.prepare(float_model, {"weight": {"bits": 4}}, example_inputs=x[:8])
    qat.calibrate(model, train_loader, num_batches=32)     # observe, then freeze the ranges
    accuracy = evaluate(model)                              # the PTQ model: fake-quant on

Batches come in the shapes dataloaders yield (:func:`qat.training.batches.model_inputs`): a tensor, ``(inputs, targets)``
or a mapping of keyword arguments (Hugging Face batches, whose ``labels`` are dropped).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from qat.errors import QATError
from qat.training.batches import call_model, model_inputs
from qat.training.control import set_fake_quant, set_observers


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None, progress: bool = False) -> int:
    """Post-training quantization of a prepared model: observe ranges, then freeze them.

    Runs ``num_batches`` batches (all, when None) in eval mode with every observer on and fake
    quantization off, so the ranges describe the float model's tensors; then turns fake
    quantization on and observers off. Folded BatchNorm uses its running statistics, as at
    deployment. Returns the number of batches seen.

    Example::

        qat.calibrate(model, train_loader, num_batches=32)
    """
    if num_batches is not None and num_batches < 1:
        raise QATError(f"num_batches must be ≥ 1 or None; got `{num_batches!r}`")
    was_training = model.training
    model.eval()
    set_observers(model, True)
    set_fake_quant(model, False)
    seen = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("PTQ calibration", total=num_batches)
        for batch in islice(batches, num_batches):
            call_model(model, model_inputs(batch))
            seen += 1
            bar.advance(task)
    if seen == 0:
        raise QATError("calibrate got no batches: the dataloader is empty")
    set_fake_quant(model, True)
    set_observers(model, False)
    model.train(was_training)
    return seen
