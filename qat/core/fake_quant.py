"""Fake quantization: the one definition of the math, with a training face and an export face.

The contract (docs/numeric-contract.md): for a scale ``s``, an integer zero point ``z`` and a
code range ``[qmin, qmax]``::

    q = clamp(round_half_to_even(x / s) + z, qmin, qmax)
    y = (q - z) * s

bit for bit what ONNX ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)`` gives, with ``s`` and ``z``
in ONNX layout: a scalar (per tensor), a 1-D tensor with ``axis`` (per channel), or a tensor of
``x``'s rank with ``block_size`` along ``axis`` (blocked; also used for per-token scales, whose
block is the whole last dimension). Ranges narrower than the integer type (3 bits, narrow range)
are the same ops after a ``Clip`` to ``[(qmin - z) * s, (qmax - z) * s]``.

The arithmetic is done in float32: an input in bf16/fp16 is upcast, quantized, and the result
cast back (in ONNX: ``Cast → Q → DQ → Cast``). Two guards keep bad parameters from producing NaN:
the scale is clamped to at least :data:`MIN_SCALE` (torch.ao's ``eps``) and the zero point is
rounded and clamped into ``[qmin, qmax]`` (learnable zero points are real-valued).

Two faces of the same function:

- :class:`FakeQuantizeFunction` (training): an ``autograd.Function`` whose forward is plain tensor
  ops, so ``torch.compile`` sees through it and fuses it with neighbours; its backward gives the
  straight-through gradient for ``x`` and LSQ / LSQ+ gradients for scale and zero point.
- ``torch.ops.qat.fake_quantize`` (export): a ``torch.library.custom_op`` that the ONNX exporter
  maps to QuantizeLinear/DequantizeLinear (:mod:`qat.export.qdq`). A custom op is opaque to
  Inductor, which is why training does not use it.

:func:`fake_quantize` picks the face: the custom op while a model is exported (inside
:func:`exporting`, or whenever ``torch.export`` traces on torch ≥ 2.14), the autograd function
otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from qat.speed import fused_kernels

MIN_SCALE = torch.finfo(torch.float32).eps
"""Smallest scale used: zero or tiny scales are raised to this (torch.ao observers' ``eps``)."""


def broadcast_qparam(param: Tensor, x: Tensor, axis: int, block_size: int) -> Tensor:
    """Reshape a scale or zero point from ONNX layout to a shape that broadcasts against ``x``.

    ``axis`` must already be non-negative. Per-tensor ``()`` stays a scalar; per-axis ``(C,)``
    becomes ``(1, …, C, …, 1)``; blocked ``(…, ceil(n / B), …)`` is repeated ``B`` times along
    ``axis`` and cut to ``n`` (the last block may be partial, as in ONNX).
    """
    if param.ndim == 0:
        return param
    if block_size == 0:
        shape = [1] * x.ndim
        shape[axis] = -1
        return param.reshape(shape)
    if param.shape[axis] == 1:  # one block spans the axis (per-token): plain broadcasting
        return param
    return param.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])


def _guarded(scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> tuple[Tensor, Tensor | None]:
    z = None if zero_point is None else zero_point.float().round().clamp(qmin, qmax)
    return scale.float().clamp_min(MIN_SCALE), z


def host_reads_are_free(t: Tensor) -> bool:
    """True where reading a value of ``t`` on the host costs no synchronisation: on the CPU,
    outside ``torch.compile`` (where a read would break the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


class QuantizedCodes:
    """The integer codes of one fake quantization, kept to make its value again later: one byte an
    element where the value takes four (float32) or two, for a caller that must hold the value
    until the backward pass (a quantized layer's saved operands,
    :meth:`~qat.modules.base.QuantizedLayer.recomputing`).

    Pass an empty one as ``codes=`` to :func:`fake_quantize`: it is filled on the PyTorch path in
    eager mode with fixed scales, when the codes fit a byte and the value holds no NaN (a NaN has
    no code; checked with one host read, so on the CPU only), and :attr:`filled` says whether it
    was. :meth:`dequantize` gives the value bit for bit: the same subtract, multiply and cast on
    the same numbers as the fake quantization's last steps.

    Where one code beyond each end of the range still fits in ``int8`` (ranges of up to 7 bits,
    such as int4 weights), the codes are kept clamped to ``[qmin - 1, qmax + 1]`` instead: they
    then carry the straight-through mask too (:func:`mask_from_codes`), and the fake quantization
    saves them instead of a mask of its own, one byte an element less.

    Example:
        >>> import torch
        >>> from qat.core.fake_quant import QuantizedCodes, fake_quantize, mask_from_codes
        >>> codes = QuantizedCodes()
        >>> y = fake_quantize(torch.tensor([0.26, -1.0, 9.0]), torch.tensor(0.5), None, -8, 7, codes=codes)
        >>> codes.codes, torch.equal(codes.dequantize(), y)  # int4: 9.0 / 0.5 saturates, kept as 8
        (tensor([ 1, -2,  8], dtype=torch.int8), True)
        >>> mask_from_codes(codes.codes, -8, 7)
        tensor([ True,  True, False])
    """

    __slots__ = ("codes", "dtype", "input_finite", "qrange", "restore", "scale", "zero_point")

    def __init__(self) -> None:
        self.codes: Tensor | None = None
        # set by a caller that knows the input holds no NaN or infinity (an observer has just seen
        # it, :attr:`qat.core.observers.Observer.all_finite`): the codes then need no NaN check
        self.input_finite = False

    @property
    def filled(self) -> bool:
        return self.codes is not None

    @staticmethod
    def carries_mask(qmin: int, qmax: int) -> bool:
        """Whether codes of ``[qmin, qmax]`` are kept one step wider, carrying the mask."""
        return qmin - 1 >= -128 and qmax + 1 <= 127

    def keep(self, clamped: Tensor, s: Tensor, z: Tensor | None, dtype: torch.dtype, qmin: int, qmax: int) -> None:
        """Keep ``clamped`` (the codes as float32 before the zero point is taken off, clamped to
        ``[qmin, qmax]``, or one step wider where :meth:`carries_mask`) in a byte, with the guarded
        ``s`` and ``z`` and the value's dtype, if it can be done exactly."""
        code_dtype = torch.int8 if qmin >= -128 and qmax <= 127 else torch.uint8 if qmin >= 0 and qmax <= 255 else None
        if code_dtype is None or not host_reads_are_free(clamped):
            return
        # a clamped code is finite unless it is NaN, and a sum of codes cannot overflow float32; a
        # finite input (over a scale of at least MIN_SCALE) gives no NaN, so then no check is needed
        if not self.input_finite and not math.isfinite(float(clamped.sum())):
            return
        self.codes, self.scale, self.zero_point, self.dtype = clamped.to(code_dtype), s, z, dtype
        self.qrange = (qmin, qmax)
        self.restore: Callable[[Tensor], Tensor] = _same

    def dequantize(self) -> Tensor:
        """The fake-quantized value, as :func:`fake_quantize` returned it: the codes (exact in
        float32; clamped back into the range where they are kept wider) less the zero point, times
        the scale, in float32, cast to the value's dtype. The codes are converted to float32
        first and the rest done in place: PyTorch's CPU kernels run a mixed ``int8 * float32``
        about 1.4–1.8× slower than the conversion and a float32 multiply together (the same
        numbers: the conversion is exact, and mixed operands are computed in float32 anyway)."""
        codes = self.codes.clamp(*self.qrange) if self.carries_mask(*self.qrange) else self.codes
        y = codes.float()
        y = y.mul_(self.scale) if self.zero_point is None else y.sub_(self.zero_point).mul_(self.scale)
        return self.restore(y if y.dtype == self.dtype else y.to(self.dtype))


def _same(t: Tensor) -> Tensor:
    return t


def fake_quantize_math(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """The forward value, with ``scale`` and ``zero_point`` already broadcastable against ``x``."""
    s, z = _guarded(scale, zero_point, qmin, qmax)
    q = torch.clamp(torch.round(x.float() / s) + z, qmin, qmax)
    y = (q - z) * s
    # no `.to()` when the dtype already matches: a no-op `.to` as an autograd.Function's output
    # makes Dynamo before torch 2.13 drop the custom backward's gradient (zero gradients, seen with 2.11)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _multiply_last(t: Tensor, s: Tensor) -> Tensor:
    """``t * s``, the last op of the in-place fast paths: in place in eager mode, out of place under
    ``torch.compile`` (where Inductor fuses the ops and in-place buys nothing). Dynamo before torch
    2.13 drops an ``autograd.Function``'s custom backward when its output comes from an in-place op
    (zero gradients; seen with torch 2.11, ``tests/test_compile.py``)."""
    return t * s if torch.compiler.is_compiling() else t.mul_(s)


def fake_quantize_with_mask(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, overwrite: bool = False,
    codes: QuantizedCodes | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`fake_quantize_math`'s value (equal, as values, bit for bit) and the straight-through
    mask ``qmin <= round(x / s) + z <= qmax``, in the fewest passes over ``x``.

    The fast path of training. It makes the codes in one intermediate (divide, round and add the
    zero point in place), clamps them into a second, which it rewrites in place (subtract the
    zero point, multiply), and takes the mask from comparing the two. ``zero_point`` None means 0
    (signed symmetric), which skips the add and subtract. The only bit that can differ from the reference
    is the sign of a zero: ``-0.0`` where ``x / s`` rounds to ``-0`` without a zero point to add.
    On a GPU in eager mode one Triton kernel computes the same bits (:mod:`qat.speed.fused_kernels`).
    ``overwrite``: ``x`` is a float32 temporary of the caller's, which the PyTorch ops may use for
    the codes instead of allocating them. ``codes``: filled with the integer codes where it can
    be (:class:`QuantizedCodes`; the PyTorch ops only). The mask is None where the filled codes
    carry it (:func:`mask_from_codes`): then it was not computed, and the value is made in place
    in the first intermediate, once the codes are kept, with no second one.
    """
    s, z = _guarded(scale, zero_point, qmin, qmax)
    if fused_kernels.can_fuse(x, s):
        return fused_kernels.fake_quantize_fused(x, s, z, qmin, qmax)
    return _with_mask_ops(x, s, z, qmin, qmax, overwrite, codes=codes)


def _with_mask_ops(
    x: Tensor, s: Tensor, z: Tensor | None, qmin: int, qmax: int, overwrite: bool = False, value: bool = True,
    codes: QuantizedCodes | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`fake_quantize_with_mask` in PyTorch ops, with ``s`` and ``z`` already guarded.

    The mask is where clamping the codes changed nothing (``NaN != NaN``, so a NaN is outside).
    In eager mode the comparison writes 1.0 / 0.0 over the unclamped codes, which are not needed
    after it, and converts them to bool to be kept (``value`` False: the mask alone, to be used at
    once, stays 1.0 / 0.0): PyTorch's CPU comparisons write a bool output through a
    loop about four times slower than a float one, and float → bool is one vectorized pass (a
    512×512×3×3 weight: 0.29 ms for the clamp and the mask against 0.88 ms for two bool
    comparisons and an in-place clamp, 2-core AVX-512 EPYC, torch 2.14)."""
    code = x.div_(s) if overwrite and x.dtype == torch.float32 else x.float() / s
    code.round_()
    if z is not None:
        code.add_(z)
    wide = value and codes is not None and QuantizedCodes.carries_mask(qmin, qmax)
    if wide:  # one step beyond each end: a code outside the range still differs from y below, NaN too
        codes.keep(code.clamp_(qmin - 1, qmax + 1), s, z, x.dtype, qmin, qmax)
    if wide and codes.filled:  # the codes carry the mask: none to make, so the value needs no second intermediate
        y, inside = code.clamp_(qmin, qmax), None
    else:
        y = code.clamp(qmin, qmax)
        inside = (y == code) if torch.compiler.is_compiling() else torch.eq(y, code, out=code)
        if value and inside.dtype != torch.bool:  # kept for the backward pass: one byte an element
            inside = inside.to(torch.bool)
    if not value:  # the mask alone (straight_through_grad), used at once: 1.0 / 0.0 in eager mode
        return None, inside
    if codes is not None and not wide:
        codes.keep(y, s, z, x.dtype, qmin, qmax)
    if z is not None:
        y.sub_(z)
    y = _multiply_last(y, s)
    return (y if y.dtype == x.dtype else y.to(x.dtype)), inside


def fake_quantize_values(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """:func:`fake_quantize_with_mask`'s value alone, in four in-place passes over one new tensor
    (five or six with a zero point; one Triton kernel on a GPU): what a backward pass recomputes
    instead of saving."""
    s, z = _guarded(scale, zero_point, qmin, qmax)
    if fused_kernels.can_fuse(x, s):
        return fused_kernels.fake_quantize_fused(x, s, z, qmin, qmax, mask=False)[0]
    y = x.float() / s
    y.round_()
    if z is not None:
        y.add_(z).clamp_(qmin, qmax).sub_(z)
    else:
        y.clamp_(qmin, qmax)
    y = _multiply_last(y, s)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def straight_through_grad(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """``grad`` times :func:`fake_quantize_with_mask`'s mask, the mask made again from ``x`` (a
    backward pass that did not save it). In eager mode on the PyTorch ops the comparison's 1.0 /
    0.0 is multiplied by ``grad`` (:func:`_times_float_mask`), as :func:`_masked_grad` does: no
    bool mask, no mixed-dtype product, the same bits."""
    s, z = _guarded(scale, zero_point, qmin, qmax)
    if fused_kernels.can_fuse(x, s):
        return pass_inside(grad, fused_kernels.fake_quantize_fused(x, s, z, qmin, qmax, value=False)[1])
    inside = _with_mask_ops(x, s, z, qmin, qmax, value=False)[1]
    return pass_inside(grad, inside) if inside.dtype == torch.bool else _times_float_mask(grad, inside.to(grad.dtype))


def pass_inside(grad: Tensor, inside: Tensor) -> Tensor:
    """``grad * inside``, the straight-through gradient, with the bool mask read as ``uint8`` in
    eager mode: the same bytes and the same product, but PyTorch's CPU kernels convert a bool
    operand to float in a temporary, through a loop about three times slower than a ``uint8`` one
    (a 512×512×3×3 weight: 0.61 ms against 0.20 ms, 2-core AVX-512 EPYC, torch 2.14)."""
    if torch.compiler.is_compiling() or inside.dtype != torch.bool:
        return grad * inside
    return grad * inside.view(torch.uint8)


def _save_mask(ctx, inside: Tensor | None, codes: QuantizedCodes | None, *others: Tensor) -> None:
    """Save the straight-through mask (and ``others``) for the backward pass: ``inside``, or, where
    :func:`fake_quantize_with_mask` left it to the codes (None), the codes themselves, which the
    layer saves for its own backward anyway."""
    ctx.codes_range = None if inside is not None else codes.qrange
    ctx.save_for_backward(inside if inside is not None else codes.codes, *others)


def _masked_grad(ctx, grad: Tensor) -> Tensor:
    """``grad`` times the mask :func:`_save_mask` saved, the straight-through gradient, as a new
    tensor. From codes in eager mode, the comparison writes the mask as 1.0 / 0.0 in ``grad``'s
    dtype, which is multiplied by ``grad`` (:func:`_times_float_mask`): PyTorch's CPU kernels
    write a bool comparison, and multiply a float by a bool or ``uint8`` operand, through slower
    loops (:func:`pass_inside`). ResNet-18's 20 folded weights' backward (with
    :func:`_summed_product`) took 5.5 ms, against 7.4 ms with a ``uint8`` mask (2-core AVX-512
    EPYC, torch 2.14)."""
    saved = ctx.saved_tensors[0]
    if ctx.codes_range is None:
        return pass_inside(grad, saved)
    qmin, qmax = ctx.codes_range
    if torch.compiler.is_compiling():
        return grad * mask_from_codes(saved, qmin, qmax)
    return _times_float_mask(grad, torch.eq(saved.clamp(qmin, qmax), saved, out=torch.empty_like(saved, dtype=grad.dtype)))


def _times_float_mask(grad: Tensor, mask: Tensor) -> Tensor:
    """``grad * mask`` for a mask of 1.0 / 0.0 in ``grad``'s dtype that is a temporary of ours:
    in place on the mask where it is laid out as ``grad`` (a product commutes: the same bits),
    else out of place. The product must be laid out as ``grad * mask`` would be (PyTorch lays it
    out as its first operand where that one is dense), since the order of a later reduction over
    it (a fold factor's gradient, a BatchNorm's backward) follows its layout."""
    return mask.mul_(grad) if mask.stride() == grad.stride() else grad * mask


def mask_from_codes(codes: Tensor, qmin: int, qmax: int) -> Tensor:
    """The straight-through mask of codes kept one step wider than ``[qmin, qmax]``
    (:meth:`QuantizedCodes.carries_mask`): where clamping them into the range changes nothing.
    Compared in ``int8``, which PyTorch's CPU kernels write as ``bool`` quickly (0.07 ms for a
    512×512×3×3 weight, where a float comparison into ``bool`` takes 0.4 ms)."""
    return codes.clamp(qmin, qmax) == codes


class FakeQuantizeFunction(torch.autograd.Function):
    """Training face: forward = :func:`fake_quantize_math`; backward = STE + LSQ / LSQ+.

    Gradients (Esser et al. 2020, LSQ; Bhalgat et al. 2020, LSQ+; the same formulas as ATen's
    ``_fake_quantize_learnable_per_*_affine``), with ``u = x / s`` and ``q`` the clamped code:

    - ``x``: ``dy`` where ``qmin <= round(u) + z <= qmax``, else 0 (straight-through estimator).
    - ``s``: ``(q - z) - u`` inside the range, ``qmin - z`` / ``qmax - z`` outside; summed over
      the elements that share the scale and multiplied by ``grad_factor`` (LSQ's gradient
      scale ``1 / sqrt(N * qmax)``, supplied by the caller).
    - ``z``: 0 inside the range, ``-s`` outside, scaled the same way.

    What is saved depends on what needs a gradient:

    - fixed scale and zero point (observed ranges, the common case): only the straight-through
      mask, one byte an element, computed with the value in one pass
      (:func:`fake_quantize_with_mask`); the backward is one multiply. Where ``codes`` are kept
      one step wider than the range (:class:`QuantizedCodes`), those instead: they carry the mask;
    - the same with ``keep_input``: ``x`` and copies of the parameters, from which the backward
      remakes the mask. For a caller that keeps ``x`` alive anyway (a layer that recomputes its
      quantized input in backward, :func:`qat.set_recompute`): then the mask is the only new
      tensor, and not saving it is free;
    - learnable scale or zero point: the inputs, from which the backward recomputes the rest.

    ``zero_point`` None means 0 (no add and subtract); it is never learnable.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor, keep_input=False, codes=None):
        ctx.learnable = ctx.needs_input_grad[1] or (zero_point is not None and ctx.needs_input_grad[2])
        ctx.keep_input = keep_input and not ctx.learnable
        if ctx.keep_input:
            # copies: an observer may update the scale in place before this backward runs
            ctx.save_for_backward(x, scale.detach().clone(), None if zero_point is None else zero_point.detach().clone())
            ctx.qrange = (qmin, qmax)
            return fake_quantize_values(x, scale, zero_point, qmin, qmax)
        if not ctx.learnable:
            y, inside = fake_quantize_with_mask(x, scale, zero_point, qmin, qmax, codes=codes)
            _save_mask(ctx, inside, codes)
            return y
        zero_point = torch.zeros_like(scale) if zero_point is None else zero_point
        # copies: an observer may update the scale in place before this backward runs (a layer
        # called twice in one forward)
        ctx.save_for_backward(x, scale.detach().clone(), zero_point.detach().clone())
        ctx.qrange = (qmin, qmax)
        ctx.grad_factor = grad_factor
        return fake_quantize_math(x, scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.keep_input:
            x, scale, zero_point = ctx.saved_tensors
            return straight_through_grad(grad_y, x, scale, zero_point, *ctx.qrange), None, None, None, None, None, None, None
        if not ctx.learnable:
            return _masked_grad(ctx, grad_y), None, None, None, None, None, None, None
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        s, z = _guarded(scale, zero_point, qmin, qmax)
        u = x.float() / s
        code = torch.round(u) + z
        inside = (code >= qmin) & (code <= qmax)
        grad_x = pass_inside(grad_y, inside) if ctx.needs_input_grad[0] else None
        grad_scale = grad_zero_point = None
        if ctx.needs_input_grad[1]:
            d_scale = torch.clamp(code, qmin, qmax) - z - torch.where(inside, u, 0.0)
            grad_scale = (grad_y.float() * d_scale).sum_to_size(scale.shape) * ctx.grad_factor
        if ctx.needs_input_grad[2]:
            d_zero_point = torch.where(inside, 0.0, -s)
            grad_zero_point = (grad_y.float() * d_zero_point).sum_to_size(zero_point.shape) * ctx.grad_factor
        return grad_x, grad_scale, grad_zero_point, None, None, None, None, None


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
        _save_mask(ctx, inside, codes, w, factor)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _, w, factor = ctx.saved_tensors
        # the two-node graph's products: the straight-through gradient (a new tensor, ours), then
        # the multiplication's backward, d(w * f)/df = w summed over each channel and d/dw = f
        grad = _masked_grad(ctx, grad_y)
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


@torch.library.custom_op("qat::fake_quantize", mutates_args=())
def fake_quantize_op(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int, block_size: int, name: str = ""
) -> Tensor:
    """Export face: ``DequantizeLinear(QuantizeLinear(x))`` as one op the ONNX exporter can map.

    ``scale`` / ``zero_point`` are in ONNX layout; ``block_size`` 0 means per-tensor or per-axis.
    ``name``: the quantizer's module path in the exported model (:attr:`Quantizer.export_name
    <qat.core.quantizer.Quantizer.export_name>`), which the exporter reads back from the graph to
    attribute each QuantizeLinear to its quantizer; empty when not known.
    """
    s = broadcast_qparam(scale, x, axis, block_size)
    z = broadcast_qparam(zero_point, x, axis, block_size)
    return fake_quantize_math(x, s, z, qmin, qmax)


@fake_quantize_op.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, block_size, name=""):
    return torch.empty_like(x)


def fake_quantize_folded(
    w: Tensor, factor: Tensor, folded: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, *, axis: int = 0,
    codes: QuantizedCodes | None = None,
) -> Tensor:
    """``fake_quantize(w * factor, scale, zero_point, qmin, qmax, axis=axis)`` with fixed
    per-tensor or per-channel parameters, the same value and gradients in fewer passes.

    ``folded`` must be ``w * factor`` computed without a gradient (the caller's, to observe it):
    it is overwritten. For eager training; :class:`qat.core.quantizer.Quantizer` picks it when it may.
    ``codes``: as :func:`fake_quantize`'s.

    Example:
        >>> import torch
        >>> from qat.core.fake_quant import fake_quantize_folded
        >>> w, f = torch.tensor([[0.3, -1.0]], requires_grad=True), torch.tensor([[2.0]])
        >>> fake_quantize_folded(w, f, (w * f).detach(), torch.tensor(0.5), None, -8, 7)
        tensor([[ 0.5000, -2.0000]], grad_fn=<FoldedFakeQuantizeFunctionBackward>)
    """
    _, s, z, _ = _in_layout(w, scale, zero_point, axis % w.ndim if w.ndim else 0, 0)
    return FoldedFakeQuantizeFunction.apply(w, factor, folded, s, z, qmin, qmax, codes)


IS_EXPORTING_RELIABLE = TorchVersion(torch.__version__) >= "2.14"
"""From torch 2.7 to 2.13, Dynamo answers ``torch.compiler.is_exporting()`` with True under plain
``torch.compile`` too (pytorch#176347, fixed in 2.14 by #176499), so it cannot tell training under
compile from export; there only :func:`exporting` selects the export face."""

_exporting = False


@contextmanager
def exporting() -> Iterator[None]:
    """Inside this block, fake quantization traces as the ``qat::fake_quantize`` custom op (the
    export face) on every torch version. Wrap ``torch.onnx.export`` / ``torch.export`` in it."""
    global _exporting
    previous, _exporting = _exporting, True
    try:
        yield
    finally:
        _exporting = previous


def export_face() -> bool:
    """True while a model is being exported: inside :func:`exporting`, or (torch ≥ 2.14) whenever
    ``torch.export`` traces."""
    return _exporting or (IS_EXPORTING_RELIABLE and torch.compiler.is_exporting())


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    *,
    axis: int = 0,
    block_size: int = 0,
    grad_factor: float = 1.0,
    keep_input: bool = False,
    codes: QuantizedCodes | None = None,
    name: str = "",
) -> Tensor:
    """Fake-quantize ``x`` with ONNX-layout parameters; differentiable (STE, LSQ / LSQ+).

    Args:
        x: any float tensor (fp32, bf16, fp16).
        scale: float scale: ``()``, ``(C,)`` along ``axis``, or blocked (``x``'s rank).
        zero_point: same shape as ``scale``, integer-valued (a real-valued learnable zero point
            is rounded in the forward pass, straight-through in the backward pass); None for 0,
            which saves two passes over ``x`` in training.
        qmin, qmax: the integer code range, e.g. ``-8, 7`` for int4.
        axis: the per-channel or block axis (negative counts from the end).
        block_size: elements per block along ``axis``; 0 for per-tensor / per-channel.
        grad_factor: multiplies the scale and zero-point gradients (LSQ gradient scaling).
        keep_input: with fixed parameters, save ``x`` for the backward pass instead of the
            straight-through mask (for a caller that keeps ``x`` alive anyway); same gradients.
        codes: an empty :class:`QuantizedCodes`, filled with the result's integer codes where
            they can be kept exactly (eager, fixed parameters, the PyTorch ops on the CPU).
        name: the quantizer's module path, carried by the export face's op (``qat::fake_quantize``).

    Example:
        >>> import torch
        >>> from qat.core.fake_quant import fake_quantize
        >>> fake_quantize(torch.tensor([0.26, -1.0, 9.0]), torch.tensor(0.5), torch.tensor(0.0), -8, 7)
        tensor([ 0.5000, -1.0000,  3.5000])
    """
    axis = axis % x.ndim if x.ndim else 0
    if export_face():
        zero_point = torch.zeros_like(scale) if zero_point is None else zero_point
        return torch.ops.qat.fake_quantize(x, scale, zero_point, qmin, qmax, axis, block_size, name)
    x_in, s, z, restore = _in_layout(x, scale, zero_point, axis, block_size)
    y = restore(FakeQuantizeFunction.apply(x_in, s, z, qmin, qmax, grad_factor, keep_input, codes))
    if codes is not None and codes.filled:
        codes.restore = restore
    return y


def _in_layout(x: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int, block_size: int):
    """``x`` and its parameters laid out to broadcast against each other (``axis`` non-negative),
    and the function that takes a result back to ``x``'s shape. Whole blocks split the axis and
    broadcast the scales rather than repeat them to ``x``'s size."""
    if block_size and scale.ndim and scale.shape[axis] > 1 and x.shape[axis] % block_size == 0:
        z = None if zero_point is None else zero_point.unsqueeze(axis + 1)
        return x.unflatten(axis, (-1, block_size)), scale.unsqueeze(axis + 1), z, lambda t: t.flatten(axis, axis + 1)
    s = broadcast_qparam(scale, x, axis, block_size)
    z = None if zero_point is None else broadcast_qparam(zero_point, x, axis, block_size)
    return x, s, z, lambda t: t


def fake_quantize_kept(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, *, axis: int = 0, block_size: int = 0
) -> tuple[Tensor, Tensor]:
    """:func:`fake_quantize`'s value with fixed parameters and its straight-through mask, both in
    ``x``'s shape and outside autograd: for a caller that keeps them to use again while ``x`` and
    the parameters are unchanged (:func:`reuse_fake_quantized`)."""
    axis = axis % x.ndim if x.ndim else 0
    x_in, s, z, restore = _in_layout(x.detach(), scale.detach(), None if zero_point is None else zero_point.detach(), axis, block_size)
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
        >>> from qat.core.fake_quant import fake_quantize_kept, reuse_fake_quantized
        >>> w = torch.tensor([0.26, -1.0, 9.0], requires_grad=True)
        >>> y, inside = fake_quantize_kept(w, torch.tensor(0.5), None, -8, 7)
        >>> reuse_fake_quantized(w, y, inside).sum().backward()
        >>> w.grad
        tensor([1., 1., 0.])
    """
    return _ReusedFakeQuantize.apply(x, y, inside)
