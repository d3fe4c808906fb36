"""Autograd functions of the speed wing: fixed-parameter fake quantization that saves a mask, its
input or integer codes (:func:`fake_quantize_fixed`); BatchNorm folding and fake quantization as
one node (:func:`fake_quantize_folded`); a weight's fake-quantized value kept and used again
(:func:`fake_quantize_kept`, :func:`reuse_fake_quantized`); learned scales whose gradient terms are
made in the forward pass (:func:`fake_quantize_learned`). Each gives the values and gradients of
:func:`qat.core.fake_quant.fake_quantize`, bit for bit."""

from __future__ import annotations

import torch
from torch import Tensor

from qat.core.fake_quant import guarded, in_layout
from qat.errors import QATError
from qat.speed.codes import QuantizedCodes
from qat.speed.masks import (
    fake_quantize_values,
    fake_quantize_with_mask,
    masked_grad,
    pass_inside,
    save_mask,
    straight_through_grad,
)


class FixedFakeQuantizeFunction(torch.autograd.Function):
    """:class:`~qat.core.fake_quant.FakeQuantizeFunction` with fixed scale and zero point (observed
    ranges, the common case), saving less for the backward pass:

    - the straight-through mask, one byte an element, computed with the value in one pass
      (:func:`~qat.speed.masks.fake_quantize_with_mask`); the backward is one multiply. Where
      ``codes`` are kept one step wider than the range (:class:`~qat.speed.codes.QuantizedCodes`),
      those instead: they carry the mask;
    - with ``keep_input``, ``x`` and copies of the parameters, from which the backward remakes the
      mask: for a caller that keeps ``x`` alive anyway (a layer that recomputes its quantized
      input in backward, :func:`qat.set_recompute`), where not saving a mask is free.

    ``zero_point`` None means 0 (no add and subtract).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, keep_input=False, codes=None):
        ctx.keep_input = keep_input
        if keep_input:
            # copies: an observer may update the scale in place before this backward runs
            ctx.save_for_backward(x, scale.detach().clone(), None if zero_point is None else zero_point.detach().clone())
            ctx.qrange = (qmin, qmax)
            return fake_quantize_values(x, scale, zero_point, qmin, qmax)
        y, inside = fake_quantize_with_mask(x, scale, zero_point, qmin, qmax, codes=codes)
        save_mask(ctx, inside, codes)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.keep_input:
            x, scale, zero_point = ctx.saved_tensors
            return straight_through_grad(grad_y, x, scale, zero_point, *ctx.qrange), None, None, None, None, None, None
        return masked_grad(ctx, grad_y), None, None, None, None, None, None


def fake_quantize_fixed(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, *, axis: int = 0, block_size: int = 0,
    keep_input: bool = False, codes: QuantizedCodes | None = None,
) -> Tensor:
    """:func:`qat.core.fake_quant.fake_quantize` with fixed parameters (no gradient for the scale
    or zero point), the same value and gradient in fewer passes and less saved memory.

    ``keep_input``: save ``x`` for the backward pass instead of the straight-through mask (for a
    caller that keeps ``x`` alive anyway); ``codes``: an empty
    :class:`~qat.speed.codes.QuantizedCodes`, filled with the result's integer codes where they
    can be kept exactly (eager mode, the PyTorch ops on the CPU).

    Example:
        >>> import torch
        >>> from qat.speed.functions import fake_quantize_fixed
        >>> fake_quantize_fixed(torch.tensor([0.26, -1.0, 9.0]), torch.tensor(0.5), None, -8, 7)
        tensor([ 0.5000, -1.0000,  3.5000])
    """
    if scale.requires_grad or (zero_point is not None and zero_point.requires_grad):
        raise QATError("fake_quantize_fixed takes a fixed scale and zero point; qat.fake_quantize learns them (LSQ)")
    axis = axis % x.ndim if x.ndim else 0
    x_in, s, z, restore = in_layout(x, scale, zero_point, axis, block_size)
    y = restore(FixedFakeQuantizeFunction.apply(x_in, s, z, qmin, qmax, keep_input, codes))
    if codes is not None and codes.filled:
        codes.restore = restore
    return y


class FoldedFakeQuantizeFunction(torch.autograd.Function):
    """``FakeQuantizeFunction(w * factor)`` with fixed parameters, as one autograd node: the value
    and the gradients of ``w`` and ``factor`` are those of the two-node graph, bit for bit, in two
    fewer weight-sized allocations (BatchNorm folding, where ``factor`` is per output channel).

    ``folded`` is ``w * factor`` without a gradient, which the caller computed to observe it and
    hands over: the forward overwrites it with the result. The backward makes ``dy * mask`` and
    scales it by ``factor`` in place, where the multiplication's own backward would allocate
    another weight-sized tensor, and on the CPU sums the product for ``factor``'s gradient a few
    channels at a time beside it (:func:`_summed_product`). ``w`` is saved for ``factor``'s
    gradient; a parameter, it is alive anyway.
    """

    @staticmethod
    def forward(ctx, w, factor, folded, scale, zero_point, qmin, qmax, codes=None):
        y, inside = fake_quantize_with_mask(folded, scale, zero_point, qmin, qmax, overwrite=True, codes=codes)
        save_mask(ctx, inside, codes, w, factor)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _, w, factor = ctx.saved_tensors
        # the two-node graph's products: the straight-through gradient (a new tensor, ours), then
        # the multiplication's backward, d(w * f)/df = w summed over each channel and d/dw = f
        grad = masked_grad(ctx, grad_y)
        grad_factor = _summed_product(grad, w, factor.shape) if ctx.needs_input_grad[1] else None
        grad_w = grad.mul_(factor) if ctx.needs_input_grad[0] else None
        return grad_w, grad_factor, None, None, None, None, None, None


SUMMED_PRODUCT_ELEMENTS = 1 << 18
"""Elements of the product :func:`_summed_product` makes at a time (1 MiB in float32)."""


def _summed_product(a: Tensor, b: Tensor, shape: torch.Size) -> Tensor:
    """``(a * b).sum_to_size(shape)``, bit for bit, where ``shape`` keeps only ``a``'s first axis
    (a per-channel factor's gradient): the product is made a block of channels at a time, in one
    buffer of at most :data:`SUMMED_PRODUCT_ELEMENTS`, rather than all at once. In a folded
    weight's backward that spares the one weight-sized temporary beside the straight-through
    gradient, where a backward's memory peaks. Each channel's sum is the same: PyTorch's CPU
    kernels reduce each row of a reduction with more than one output in one thread, in an order
    set by the row alone, the memory order (checked with 1 to 4 threads, contiguous and channels
    last). Elsewhere, and on other devices (whose reductions may split a row differently for
    fewer rows), the plain product and sum."""
    channels = a.shape[0] if a.ndim else 1
    per_channel = tuple(shape) == (channels,) + (1,) * (a.ndim - 1)
    row = a.numel() // max(1, channels)
    rows = max(2, SUMMED_PRODUCT_ELEMENTS // max(1, row))
    # each channel's elements as one row in memory order (a channels-last weight too), where
    # that is dense; b, laid out as a, is then too
    order = [0, *sorted(range(1, a.ndim), key=lambda dim: -a.stride(dim))]
    if not (a.device.type == "cpu" and per_channel and rows < channels and a.shape == b.shape and a.stride() == b.stride()
            and a.permute(order).is_contiguous()):
        return (a * b).sum_to_size(shape)
    out, buffer = a.new_empty(shape), a.new_empty(rows, row)
    a_rows, b_rows = a.permute(order).view(channels, row), b.permute(order).view(channels, row)
    blocks = zip(a_rows.split(rows), b_rows.split(rows), out.view(channels, 1).split(rows))
    for a_block, b_block, out_block in blocks:  # split: one op for all the blocks, where slicing is one op each
        product = torch.mul(a_block, b_block, out=buffer if len(a_block) == rows else buffer[: len(a_block)])
        torch.sum(product, dim=1, keepdim=True, out=out_block)
    return out


def fake_quantize_folded(
    w: Tensor, factor: Tensor, folded: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, *, axis: int = 0,
    codes: QuantizedCodes | None = None,
) -> Tensor:
    """``fake_quantize_fixed(w * factor, scale, zero_point, qmin, qmax, axis=axis)`` with fixed
    per-tensor or per-channel parameters, the same value and gradients in fewer passes.

    ``folded`` must be ``w * factor`` computed without a gradient (the caller's, to observe it):
    it is overwritten. For eager training; :class:`qat.core.quantizer.Quantizer` picks it when it may.
    ``codes``: as :func:`fake_quantize_fixed`'s.

    Example:
        >>> import torch
        >>> from qat.speed.functions import fake_quantize_folded
        >>> w, f = torch.tensor([[0.3, -1.0]], requires_grad=True), torch.tensor([[2.0]])
        >>> fake_quantize_folded(w, f, (w * f).detach(), torch.tensor(0.5), None, -8, 7)
        tensor([[ 0.5000, -2.0000]], grad_fn=<FoldedFakeQuantizeFunctionBackward>)
    """
    _, s, z, _ = in_layout(w, scale, zero_point, axis % w.ndim if w.ndim else 0, 0)
    return FoldedFakeQuantizeFunction.apply(w, factor, folded, s, z, qmin, qmax, codes)


def fake_quantize_kept(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, *, axis: int = 0, block_size: int = 0
) -> tuple[Tensor, Tensor]:
    """:func:`fake_quantize_fixed`'s value and its straight-through mask, both in
    ``x``'s shape and outside autograd: for a caller that keeps them to use again while ``x`` and
    the parameters are unchanged (:func:`reuse_fake_quantized`)."""
    axis = axis % x.ndim if x.ndim else 0
    x_in, s, z, restore = in_layout(x.detach(), scale.detach(), None if zero_point is None else zero_point.detach(), axis, block_size)
    y, inside = fake_quantize_with_mask(x_in, s, z, qmin, qmax)
    return restore(y), restore(inside)


class _ReusedFakeQuantize(torch.autograd.Function):
    """A value computed earlier by :func:`fake_quantize_kept`, as a new autograd node of ``x``."""

    @staticmethod
    def forward(ctx, x, y, inside):
        ctx.save_for_backward(inside)
        return y.view_as(y)  # a new tensor object each time, so each use has its own history

    @staticmethod
    def backward(ctx, grad_y):
        (inside,) = ctx.saved_tensors
        return pass_inside(grad_y, inside), None, None


def reuse_fake_quantized(x: Tensor, y: Tensor, inside: Tensor) -> Tensor:
    """``y`` and ``inside`` from :func:`fake_quantize_kept` for this same, unchanged ``x``, as
    :func:`fake_quantize` would give them again: the same value, and the straight-through gradient
    of ``x`` (fixed parameters), bit for bit, without recomputing either.

    Example:
        >>> import torch
        >>> from qat.speed.functions import fake_quantize_kept, reuse_fake_quantized
        >>> w = torch.tensor([0.26, -1.0, 9.0], requires_grad=True)
        >>> y, inside = fake_quantize_kept(w, torch.tensor(0.5), None, -8, 7)
        >>> reuse_fake_quantized(w, y, inside).sum().backward()
        >>> w.grad
        tensor([1., 1., 0.])
    """
    return _ReusedFakeQuantize.apply(x, y, inside)


class LearnedFakeQuantizeFunction(torch.autograd.Function):
    """:class:`~qat.core.fake_quant.FakeQuantizeFunction` for learned scales (LSQ, LSQ+), with the
    backward pass's per-element terms made in the forward pass, where the forward has ``x / s`` and
    the clamped codes in hand: the straight-through mask (one byte an element) and the scale's
    gradient term ``(q - z) - u`` inside the range, ``q - z`` outside (four bytes). The backward is
    then two products and a sum, where the core's remakes ``x / s``, the codes and the mask first.
    The cost is those five bytes an element held from forward to backward; a layer that recomputes
    its operands (:func:`qat.set_recompute`) keeps the core's path, which saves nothing but its
    input."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):
        s, z = guarded(scale, zero_point, qmin, qmax)
        u = x.float() / s
        code = torch.round(u).add_(z)
        shifted = code.clamp(qmin, qmax)
        inside = shifted == code  # qmin <= code <= qmax in one pass (a NaN code is outside: NaN != NaN)
        shifted.sub_(z)  # q - z
        y = torch.mul(shifted, s, out=code)  # weight-sized buffers are made as few times as they can be
        d_scale = shifted.sub_(u.masked_fill_(~inside, 0.0)) if ctx.needs_input_grad[1] else None
        # the zero point's term, where(inside, 0, -s), is made from the mask and the scale when needed
        ctx.save_for_backward(inside, d_scale, s if ctx.needs_input_grad[2] else None)
        ctx.shapes, ctx.grad_factor = (scale.shape, zero_point.shape), grad_factor
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        inside, d_scale, s = ctx.saved_tensors
        scale_shape, zero_point_shape = ctx.shapes
        grad_x = grad_y * inside if ctx.needs_input_grad[0] else None
        grad_scale = grad_zero_point = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad_y.float() * d_scale).sum_to_size(scale_shape) * ctx.grad_factor
        if ctx.needs_input_grad[2]:
            grad_zero_point = (grad_y.float() * torch.where(inside, 0.0, -s)).sum_to_size(zero_point_shape) * ctx.grad_factor
        return grad_x, grad_scale, grad_zero_point, None, None, None


def fake_quantize_learned(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, *, axis: int = 0, block_size: int = 0, grad_factor: float = 1.0
) -> Tensor:
    """:func:`qat.core.fake_quant.fake_quantize` for a scale (and zero point) that is learned: the
    same value and the same gradients of ``x``, the scale and the zero point, bit for bit, in
    fewer passes (:class:`LearnedFakeQuantizeFunction`). For training: it computes the gradient
    terms whether or not a backward pass follows (the speed wing takes it with gradients on only).

    Example:
        >>> import torch
        >>> from qat.speed.functions import fake_quantize_learned
        >>> scale = torch.tensor(0.5, requires_grad=True)
        >>> fake_quantize_learned(torch.tensor([0.26, -1.0, 9.0]), scale, torch.tensor(0.0), -8, 7).sum().backward()
        >>> scale.grad  # (1 - 0.52) + (-2 + 2) + 7
        tensor(7.4800)
    """
    axis = axis % x.ndim if x.ndim else 0
    x_in, s, z, restore = in_layout(x, scale, zero_point, axis, block_size)
    return restore(LearnedFakeQuantizeFunction.apply(x_in, s, z, qmin, qmax, grad_factor))
