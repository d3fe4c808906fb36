"""The speed wing's answer to the core (:class:`qat.core.faster.SpeedWing`): which faster path
fits a quantizer's or a quantized layer's call, and the state those paths keep.

For a :class:`~qat.core.quantizer.Quantizer` with learned scales, in eager training, the
gradient terms made in the forward pass (:func:`~qat.speed.functions.fake_quantize_learned`).
For one with fixed scales (not learnable, not exporting):

- a weight kept by :attr:`~qat.core.quantizer.Quantizer.reuse_unchanged` is used again while the
  weight and the scale are unchanged (:func:`~qat.speed.functions.reuse_fake_quantized`);
- a weight times a folded BatchNorm's factor is one autograd node
  (:func:`~qat.speed.functions.fake_quantize_folded`);
- otherwise :func:`~qat.speed.functions.fake_quantize_fixed`, which saves a one-byte mask, the
  input, or integer codes; per-token results are shared by the layers that read one input with
  one spec (attention's q/k/v projections) while that input lives unchanged.

For a quantized layer (:class:`~qat.modules.base.QuantizedLayer`), its quantized operands are
saved for its op's backward pass as integer codes or recomputed there (:mod:`qat.speed.recompute`).
What a path needs to find again is held here, keyed weakly by the tensor it belongs to (the
codes of a result, the shared per-token result of an input): nothing is stored on tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from qat.core.fake_quant import broadcast_qparam, export_face, fake_quantize_math, host_reads_are_free
from qat.core.observers import MinMaxObserver, MSEObserver
from qat.core.quantizer import Quantizer
from qat.core.snapshot import snapshot
from qat.speed import fused_kernels, recompute
from qat.speed.codes import QuantizedCodes
from qat.speed.functions import (
    fake_quantize_fixed,
    fake_quantize_folded,
    fake_quantize_kept,
    fake_quantize_learned,
    reuse_fake_quantized,
)
from qat.speed.masks import fake_quantize_values

_codes_of: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
"""A fake-quantized result → its :class:`QuantizedCodes`, for the layer's op to save instead."""
_per_token: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
"""An input → ``(key, result)`` of its last per-token fake quantization, shared while it is unchanged."""
_kept: WeakKeyDictionary = WeakKeyDictionary()
"""A weight quantizer (:attr:`~qat.core.quantizer.Quantizer.reuse_unchanged`) → ``(key, versions, value, mask)``."""


def forget_kept(quantizer: Quantizer) -> None:
    """Free the value and mask kept for ``quantizer``'s weight (:func:`qat.set_weight_reuse`)."""
    _kept.pop(quantizer, None)


def is_kept(quantizer: Quantizer) -> bool:
    """Whether a value and mask are kept for ``quantizer``'s weight."""
    return quantizer in _kept


@dataclass(frozen=True)
class OperandRequest:
    """What a quantized layer asks of its quantizer's call (:meth:`Wing.quantize_operand`), passed
    through :meth:`Quantizer.forward <qat.core.quantizer.Quantizer.forward>` untouched."""

    keep_input: bool = False
    """Save the input for the backward pass instead of a mask (the layer keeps it alive anyway)."""
    codes: QuantizedCodes | None = None
    """Filled with the result's integer codes where they can be kept exactly."""


class Wing:
    """The :class:`~qat.core.faster.SpeedWing` that :mod:`qat.speed` registers."""

    def quantizer_forward(self, quantizer: Quantizer, x: Tensor, factor: Tensor | None, request: OperandRequest | None) -> Tensor | None:
        request = request or OperandRequest()
        return _forward(quantizer, x, factor, keep_input=request.keep_input, codes=request.codes)

    def quantize_operand(self, layer, quantizer: Quantizer, t: Tensor, factor: Tensor | None, keepable: bool) -> Tensor:
        # through the module's __call__, so hooks on the quantizer see the call
        request = OperandRequest(keep_input=layer.recompute_operands and keepable and recompute.active(t), codes=_new_codes(layer, t))
        y = quantizer(t, factor, request)
        if request.codes is not None and request.codes.filled:
            _codes_of[y] = request.codes
        return y

    def recomputing(self, layer, x: Tensor, x_q: Tensor, w_q: Tensor, weight_factor: Tensor | None) -> AbstractContextManager:
        return _recomputing(layer, x, x_q, w_q, weight_factor)

    def finite_range(self, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        return fused_kernels.finite_range_fused(rows) if fused_kernels.can_fuse_rows(rows) else None


def _forward(quantizer: Quantizer, x: Tensor, factor: Tensor | None, keep_input: bool, codes: QuantizedCodes | None) -> Tensor | None:
    """:meth:`Quantizer.forward <qat.core.quantizer.Quantizer.forward>` on the fastest path that
    fits; None where the plain path is the one (while exporting; learned scales outside eager
    training or where the input is kept for a recomputing layer)."""
    q = quantizer
    if export_face():
        return None
    if q.spec.learnable:
        return _learned(q, x, factor) if _eager_training(q, keep_input) else None
    if factor is None and _reusable(q, x, keep_input):
        return _fake_quantize_reusing(q, x)
    if factor is not None and _folds_in_one_node(q, x, factor, keep_input):
        with torch.no_grad():
            folded = x * factor
        if q.observer_enabled:
            q.observe(folded)
            _pass_finiteness(q, codes)
        zero_point = None if q.zero_point_is_zero else q.zero_point
        return fake_quantize_folded(x, factor, folded, q.scale, zero_point, q.spec.qmin, q.spec.qmax, axis=q.axis, codes=codes)
    if factor is not None:
        x = x * factor
    if q.observer_enabled:
        q.observe(x)
        _pass_finiteness(q, codes)
    if not q.fake_quant_enabled:
        return x
    if q.spec.dynamic:
        return _per_token_shared(q, x, codes)
    # a signed symmetric zero point is 0 by construction: None skips two passes over x;
    # scale / zero_point are buffers this forward may have just updated: see qat.core.snapshot
    zero_point = None if q.zero_point_is_zero else snapshot(q.zero_point)
    return fake_quantize_fixed(x, snapshot(q.scale), zero_point, q.spec.qmin, q.spec.qmax, axis=q.axis, block_size=q.block_size,
                               keep_input=keep_input, codes=codes)


def _learned(q: Quantizer, x: Tensor, factor: Tensor | None) -> Tensor:
    """The plain path's steps (the factor, observing, fake quantizing) with the learned scale's
    gradient terms made in the forward pass (:func:`~qat.speed.functions.fake_quantize_learned`)."""
    if factor is not None:
        x = x * factor
    if q.observer_enabled:
        q.observe(x)
    if not q.fake_quant_enabled:
        return x
    return fake_quantize_learned(x, q.scale, q.zero_point, q.spec.qmin, q.spec.qmax, axis=q.axis, block_size=q.block_size,
                                 grad_factor=q.grad_factor(x))


def _eager_training(q: Quantizer, keep_input: bool) -> bool:
    """Whether a learned scale takes :func:`_learned`: eager mode with gradients on (a compiled
    graph makes its own choice of what to save), the scale trained, and no input kept for a
    recomputing layer (which would rather save nothing more)."""
    return not torch.compiler.is_compiling() and torch.is_grad_enabled() and q.scale.requires_grad and not keep_input


def _per_token_shared(q: Quantizer, x: Tensor, codes: QuantizedCodes | None) -> Tensor:
    """Per-token scales depend on ``x`` alone, so layers that read one input with the same spec
    (attention's q/k/v projections, an MLP's gate and up) share one result in eager mode while
    ``x`` lives and is unchanged."""
    # inference tensors (torch.inference_mode: Lightning's validation) have no version counter
    shared = not torch.compiler.is_compiling() and not x.is_inference()
    key = (q.spec, x._version, torch.is_grad_enabled()) if shared else None
    cached = _per_token.get(x) if shared else None
    if cached is not None and cached[0] == key:
        return cached[1]
    scale, zero_point, finite = q.dynamic_qparams_checked(x)
    if codes is not None:  # the tokens' range check has seen whether x is all finite: see _pass_finiteness
        codes.input_finite = finite
    y = fake_quantize_fixed(x, scale, None if q.zero_point_is_zero else zero_point, q.spec.qmin, q.spec.qmax,
                            axis=-1, block_size=q.token_block(x), codes=codes)
    if shared:
        _per_token[x] = (key, y)
    return y


def _pass_finiteness(q: Quantizer, codes: QuantizedCodes | None) -> None:
    """Tell ``codes`` what the observer saw of the tensor it observed, the one about to be
    fake-quantized: whether it is all finite, which spares the codes a NaN check (a pass)."""
    if codes is not None:
        codes.input_finite = q.observer.all_finite


def _reusable(q: Quantizer, x: Tensor, keep_input: bool) -> bool:
    """Whether :attr:`~qat.core.quantizer.Quantizer.reuse_unchanged` applies to ``x``: a
    parameter, fixed scales, an observer (if on) whose range is a function of the current weight
    (observing it twice changes nothing), eager autograd outside inference mode (an inference
    tensor cannot be kept for a later backward pass)."""
    if not q.reuse_unchanged or not _eager_with_fixed_scales(q, keep_input):
        return False
    # a tuple, not `MinMaxObserver | MSEObserver`: Dynamo in torch 2.9 cannot trace a types.UnionType
    observer_idempotent = not q.observer_enabled or (isinstance(q.observer, (MinMaxObserver, MSEObserver)) and not q.observer.accumulate)
    return isinstance(x, torch.nn.Parameter) and observer_idempotent and not torch.is_inference_mode_enabled()


def _fake_quantize_reusing(q: Quantizer, x: Tensor) -> Tensor:
    """The forward of a weight whose value and mask are kept: computed (observing first) when the
    weight or the scale changed since, else the kept ones, as a new autograd node."""
    key = (id(x), x.data_ptr(), x._version, q.observer_enabled)
    kept = _kept.get(q)
    if kept is None or kept[0] != key or kept[1] != (q.scale._version, q.zero_point._version):
        if q.observer_enabled:
            q.observe(x)
        zero_point = None if q.zero_point_is_zero else q.zero_point
        y, inside = fake_quantize_kept(x, q.scale, zero_point, q.spec.qmin, q.spec.qmax, axis=q.axis, block_size=q.block_size)
        kept = _kept[q] = (key, (q.scale._version, q.zero_point._version), y, inside)
    return reuse_fake_quantized(x, kept[2], kept[3])


def _folds_in_one_node(q: Quantizer, x: Tensor, factor: Tensor, keep_input: bool) -> bool:
    """Whether :func:`~qat.speed.functions.fake_quantize_folded` applies: eager training with
    fixed per-tensor or per-channel parameters, float32 operands of one shape (after
    broadcasting, ``x``'s). Elsewhere the product and the fake quantization are two ops
    (compiled graphs fuse them anyway)."""
    return (
        _eager_with_fixed_scales(q, keep_input) and q.block_size == 0 and torch.is_grad_enabled()
        and x.dtype == factor.dtype == torch.float32 and _broadcasts_to(factor.shape, x.shape)
    )


def _eager_with_fixed_scales(q: Quantizer, keep_input: bool) -> bool:
    """What the one-node paths need: eager mode, fake quantization on, fixed scales (not
    per-token), and a mask to save (``keep_input`` saves the input instead)."""
    return not torch.compiler.is_compiling() and q.fake_quant_enabled and not keep_input and not q.spec.dynamic


def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` unchanged: ``torch.broadcast_shapes(shape,
    target) == target``, without its cost in eager mode."""
    return len(shape) <= len(target) and all(n in (1, t) for n, t in zip(reversed(shape), reversed(target)))


def _new_codes(layer, t: Tensor) -> QuantizedCodes | None:
    """An empty :class:`QuantizedCodes` for the quantized form of ``t`` when the layer's op will
    save it and codes can stand in for it: :attr:`~qat.modules.base.QuantizedLayer.save_codes` on
    and not recomputing, where the layer's op saves operands for a backward pass that
    :func:`_recomputing` may replace (:func:`~qat.speed.recompute.active` for ``t`` and the
    weight), where a host read is free (the CPU: the codes' NaN check reads one value), and ``t``
    not cast by autocast before the op (the op would save the cast copy instead)."""
    device = t.device.type
    if (not layer.save_codes or layer.recompute_operands or not layer.saves_operands or export_face()
            or not host_reads_are_free(t) or not recompute.active(t, layer.weight)):
        return None
    if torch.is_autocast_enabled(device) and t.dtype != torch.get_autocast_dtype(device):
        return None
    return QuantizedCodes()


def _recomputing(layer, x: Tensor, x_q: Tensor, w_q: Tensor, weight_factor: Tensor | None) -> AbstractContextManager:
    """When :attr:`~qat.modules.base.QuantizedLayer.recompute_operands` is on, the quantized input
    ``x_q`` (made from ``x``) and weight ``w_q`` (made from the layer's weight, times
    ``weight_factor`` when BatchNorm is folded) are recomputed in the backward pass instead of
    saved; otherwise those kept as integer codes are saved as their codes and dequantized there."""
    if not recompute.active(x_q, w_q):
        return nullcontext()
    if not layer.recompute_operands:
        kept = {t: codes.dequantize for t in (x_q, w_q) if (codes := _codes_of.get(t)) is not None}
        return recompute.recompute_in_backward(kept) if kept else nullcontext()
    operands = {}
    if layer.input_quantizer is not None and layer.input_quantizer.fake_quant_enabled:
        operands[x_q] = _replay(layer.input_quantizer, recompute.unchanged(x))
    if layer.weight_quantizer is not None and layer.weight_quantizer.fake_quant_enabled:
        weight = recompute.unchanged(layer.weight)
        if weight_factor is not None:
            factor = weight_factor.detach()
            operands[w_q] = _replay(layer.weight_quantizer, lambda: weight() * factor)
        else:
            operands[w_q] = _replay(layer.weight_quantizer, weight)
    return recompute.recompute_in_backward(operands)


def _replay(q: Quantizer, source: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """A function that gives, later, the value the quantizer gives now for the tensor ``source()``
    returns: the same scale and zero point (copied now; an observer may move them before the
    backward pass runs), no observing, no autograd."""
    if q.spec.dynamic:  # per-token scales come from the tensor itself
        scale = zero_point = None
    else:
        scale, zero_point = q.scale.detach().clone(), q.zero_point.detach().clone()

    @torch.no_grad()
    def again() -> Tensor:
        x = source()
        if scale is None:
            s, z, _ = q.dynamic_qparams_checked(x)
            zero = None if q.zero_point_is_zero else z
            return fake_quantize_fixed(x, s, zero, q.spec.qmin, q.spec.qmax, axis=-1, block_size=q.token_block(x))
        z = None if q.zero_point_is_zero else broadcast_qparam(zero_point, x, q.axis, q.block_size)
        s = broadcast_qparam(scale, x, q.axis, q.block_size)
        if q.spec.learnable:  # what the plain FakeQuantizeFunction's forward computed
            return fake_quantize_math(x, s, torch.zeros_like(s) if z is None else z, q.spec.qmin, q.spec.qmax)
        return fake_quantize_values(x, s, z, q.spec.qmin, q.spec.qmax)

    return again
