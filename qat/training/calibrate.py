"""Post-training quantization: calibrate a prepared model's ranges on a few batches.

::

    model = qat.prepare(float_model, {"weight": {"bits": 4}}, example_inputs=x[:8])
    qat.calibrate(model, train_loader, num_batches=32)     # observe, then freeze the ranges
    accuracy = evaluate(model)                              # the PTQ model: fake-quant on

Batches come in the shapes dataloaders yield (:func:`qat.training.batches.model_inputs`): a tensor, ``(inputs, targets)``
or a mapping of keyword arguments (Hugging Face batches, whose ``labels`` are dropped).

Two mistakes make calibrated ranges silently wrong, and :func:`calibrate` warns about both
(:class:`CalibrationWarning`, naming the layers):

- BatchNorm statistics at their initial values (mean 0, variance 1): calibration runs in eval mode,
  where BatchNorm normalises with its running statistics, so on a model that never trained in
  training mode every range describes activations the trained model will not have (an untrained
  ResNet-18's come out orders of magnitude too small, and QAT after it can diverge). Train first, or run a
  few forward passes in training mode to set the statistics;
- a collapsed range: on the last calibration batch, more than :data:`COLLAPSED_CLIPPED` of some
  quantized input falls outside its range. The fractions are also kept on the model
  (``model.qat_state.calibration_clipped``) and reported by :func:`qat.layer_stats` as
  ``<layer>/input_clipped_at_calibration``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from qat.errors import QATError
from qat.preparation.prepare import STATE_NAME
from qat.training.batches import call_model, model_inputs
from qat.training.clipping import ClipTracker
from qat.training.control import set_fake_quant, set_observers

COLLAPSED_CLIPPED = 0.5
"""The share of a calibration batch that may fall outside an input's range before the range counts as collapsed."""


class CalibrationWarning(UserWarning):
    """Calibration saw something that makes its ranges wrong (:mod:`qat.training.calibrate`)."""


def untrained_batchnorms(model: nn.Module) -> list[str]:
    """The BatchNorm layers of ``model`` that normalise with their running statistics (eval mode, or
    frozen) while those still hold their initial values: mean 0 and variance 1 in every channel."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.running_mean is not None
            and bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())]


def warn_untrained_batchnorms(model: nn.Module, stacklevel: int = 3) -> list[str]:
    """Warn (:class:`CalibrationWarning`, attributed ``stacklevel`` frames up) when
    :func:`untrained_batchnorms` finds any; returns their names."""
    names = untrained_batchnorms(model)
    if names:
        listed = ", ".join(f"`{n}`" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(f"{len(names)} BatchNorm layers normalise with statistics that still hold their initial values "
                      f"(mean 0, variance 1): {listed}. Ranges observed now describe activations the trained model will not "
                      "have. Train the float model first, or run a few forward passes in training mode (model.train(); "
                      "model(batch)) to set the statistics, then calibrate", CalibrationWarning, stacklevel=stacklevel)
    return names


def record_calibration_clipping(model: nn.Module, clips: ClipTracker, warn: bool = True, stacklevel: int = 3) -> list[str]:
    """Keep what ``clips`` measured right after calibration on the model (``qat_state.calibration_clipped``,
    reported by :func:`qat.layer_stats`) and, with ``warn``, warn (:class:`CalibrationWarning`,
    attributed ``stacklevel`` frames up) about the inputs of which more than
    :data:`COLLAPSED_CLIPPED` was clipped; returns their keys."""
    clipped = clips.fractions()
    state = getattr(model, STATE_NAME, None)
    if state is not None:
        state.calibration_clipped = clipped
    collapsed = {key: share for key, share in clipped.items() if share > COLLAPSED_CLIPPED}
    if collapsed and warn:
        listed = ", ".join(f"`{key}` ({share:.0%})" for key, share in list(collapsed.items())[:4])
        warnings.warn(f"{len(collapsed)} quantized tensors clip more than {COLLAPSED_CLIPPED:.0%} of the last calibration "
                      f"batch: {listed}. Their ranges collapsed: the calibration batches do not look like the data (or "
                      "BatchNorm statistics are not trained); qat.layer_stats(model) lists every fraction",
                      CalibrationWarning, stacklevel=stacklevel)
    return list(collapsed)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None, progress: bool = False) -> int:
    """Post-training quantization of a prepared model: observe ranges, then freeze them.

    Runs ``num_batches`` batches (all, when None) in eval mode with every observer on and fake
    quantization off, so the ranges describe the float model's tensors; then turns fake
    quantization on and observers off. Folded BatchNorm uses its running statistics, as at
    deployment. Returns the number of batches seen. Warns (:class:`CalibrationWarning`) when
    BatchNorm statistics were never trained, or when a range collapsed (module docstring).

    Example::

        qat.calibrate(model, train_loader, num_batches=32)
    """
    if num_batches is not None and num_batches < 1:
        raise QATError(f"num_batches must be ≥ 1 or None; got `{num_batches!r}`")
    was_training = model.training
    model.eval()
    set_observers(model, True)
    set_fake_quant(model, False)
    warn_untrained_batchnorms(model, stacklevel=4)  # past this function and torch.no_grad's wrapper: the caller's line
    seen = 0
    clips = ClipTracker(model)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("PTQ calibration", total=num_batches)
        pending = iter(islice(batches, num_batches))
        batch = next(pending, None)
        while batch is not None:
            following = next(pending, None)
            if following is None:  # the last batch: measure what the ranges clip
                with clips:
                    call_model(model, model_inputs(batch))
            else:
                call_model(model, model_inputs(batch))
            batch = following
            seen += 1
            bar.advance(task)
    if seen == 0:
        raise QATError("calibrate got no batches: the dataloader is empty")
    record_calibration_clipping(model, clips, stacklevel=4)  # past this function and torch.no_grad's wrapper: the caller's line
    set_fake_quant(model, True)
    set_observers(model, False)
    model.train(was_training)
    return seen
