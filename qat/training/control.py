"""Switches over a prepared model: the phases of a QAT run, as plain functions.

These are what the Lightning callback calls at each phase, and what a plain PyTorch loop calls
directly::

    qat.set_fake_quant(model, False)      # calibration: observe ranges, compute in float
    for batch in calibration_batches:
        model(batch)
    qat.set_fake_quant(model, True)       # QAT
    ...
    qat.set_observers(model, False)       # freeze ranges
    qat.freeze_bn_stats(model)            # freeze folded BatchNorm statistics

    with qat.evaluating(model):           # evaluation must not move the observed ranges
        evaluate(model)

:class:`qat.QATSchedule` sets the same switches from a step or epoch number.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qat.core.quantizer import Quantizer
from qat.modules import QuantConvNd, QuantizedLayer
from qat.speed import wing


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer in ``model``, with its fully-qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def set_observers(model: nn.Module, enabled: bool, role: str | None = None) -> None:
    """Turn range observation on or off for every quantizer (of one ``role``, when given)."""
    for _, q in quantizers(model):
        if role is None or q.role == role:
            q.enable_observer(enabled)


def set_fake_quant(model: nn.Module, enabled: bool, role: str | None = None) -> None:
    """Turn fake quantization on or off for every quantizer (of one ``role``, when given)."""
    for _, q in quantizers(model):
        if role is None or q.role == role:
            q.enable_fake_quant(enabled)


def set_recompute(model: nn.Module, enabled: bool = True) -> None:
    """Trade time for memory: every quantized layer recomputes its fake-quantized input and
    weight in the backward pass instead of saving them (:mod:`qat.speed.recompute`; eager mode).

    Off by default. The saved copies are one weight-sized tensor per layer and one input-sized
    tensor per layer that reads an activation (on the CPU, one-byte codes of them by default:
    :func:`set_save_codes`); while recomputing, the straight-through masks of the inputs and of
    unfolded weights are remade in the backward too: less peak memory for more step time
    (benchmarks/RESULTS.md has the figures). Turn it on where the forward's saved tensors set the
    peak: large batches, long sequences, GPUs.
    """
    for module in model.modules():
        if isinstance(module, QuantizedLayer):
            module.recompute_operands = bool(enabled)


def set_save_codes(model: nn.Module, enabled: bool = True) -> None:
    """Save each quantized layer's fake-quantized input and weight for the backward pass as
    one-byte integer codes, and dequantize them there, instead of saving float copies.

    On by default. The backward gets the same values, bit for bit (the fake quantization's own
    subtract, multiply and cast on the same codes), for one more pass over each operand in the
    forward (the codes, and a sum that checks for NaN, which has no code, unless the layer's
    observer has just seen the tensor all finite) and one in the backward. It applies in eager
    training on the CPU, with fixed scales, where the codes fit a byte (up to 8 bits); elsewhere,
    and for a tensor that holds a NaN, the float copy is saved. :func:`set_recompute` saves
    neither and takes precedence. For ranges of up to 7 bits (int4 weights) the codes carry the
    straight-through mask too, which is then not saved. Against float copies this lowers the peak
    memory for a little more step time (benchmarks/RESULTS.md); ``set_save_codes(model, False)``
    saves float copies: faster where memory is not short.
    """
    for module in model.modules():
        if isinstance(module, QuantizedLayer):
            module.save_codes = bool(enabled)


def set_weight_reuse(model: nn.Module, enabled: bool = True) -> None:
    """Fake-quantize each weight once per change rather than once per forward pass: with gradient
    accumulation, the micro-batches between two optimizer steps use the same weights.

    Each weight quantizer then keeps its fake-quantized weight and straight-through mask and uses
    them again while the weight (a parameter, by its version counter) and the scale are
    unchanged; the values and gradients are the same, bit for bit. It applies to fixed scales
    whose observer, if on, takes the current weight's range (``minmax``, ``mse``), in eager
    training; BatchNorm-folded weights change with the running statistics and are not kept. The
    cost is memory: one more weight-sized tensor (and a one-byte mask) per layer between steps.
    The Lightning callback turns it on when ``accumulate_grad_batches > 1``. Turning it off frees
    what was kept.

    Example:
        >>> import torch
        >>> import qat
        >>> model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(8, 4)), {"weight": {"bits": 4}})
        >>> qat.set_weight_reuse(model)
        >>> for micro_batch in torch.randn(4, 2, 8):
        ...     model(micro_batch).sum().backward()  # the weight is fake-quantized once
    """
    for _, quantizer in quantizers(model):
        if quantizer.role == "weight":
            quantizer.reuse_unchanged = bool(enabled)
            if not enabled:
                wing.forget_kept(quantizer)


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> None:
    """Freeze (or unfreeze) the statistics of every BatchNorm folded into a convolution."""
    for module in model.modules():
        if isinstance(module, QuantConvNd) and module.bn is not None:
            module.freeze_bn_stats(frozen)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Observers off inside the block, restored after it: evaluation, export or any forward pass
    that must not move the observed ranges. Fake quantization stays as it is."""
    saved = [(q, q.observer_enabled) for _, q in quantizers(model)]
    for q, _ in saved:
        q.enable_observer(False)
    try:
        yield model
    finally:
        for q, enabled in saved:
            q.enable_observer(enabled)


@contextmanager
def deployed(model: nn.Module) -> Iterator[nn.Module]:
    """The model as it is deployed, inside the block: every quantizer fake-quantizes and none
    observes, whatever phase of the schedule the model is in; restored after the block.

    Export uses it, so a model exported in its calibration phase (post-training quantization) is
    still exported quantized, not float."""
    saved = [(q, q.fake_quant_enabled) for _, q in quantizers(model)]
    for q, _ in saved:
        q.enable_fake_quant(True)
    try:
        with evaluating(model):
            yield model
    finally:
        for q, quantizing in saved:
            q.enable_fake_quant(quantizing)


@contextmanager
def deployed_inference(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`deployed`, in eval mode and without gradients: what the exporter runs to compare the
    model with a file. The model's training mode is restored after the block."""
    training = model.training
    model.eval()
    try:
        with deployed(model), torch.no_grad():
            yield model
    finally:
        model.train(training)
