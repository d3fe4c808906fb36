"""Fake quantization with fixed parameters and its straight-through mask, in the fewest passes
over the tensor: in-place PyTorch ops on the CPU, one Triton kernel on a GPU
(:mod:`qat.speed.fused_kernels`). The values equal :func:`qat.core.fake_quant.fake_quantize_math`'s
bit for bit (but the sign of a zero, see :func:`fake_quantize_with_mask`)."""

from __future__ import annotations

import torch
from torch import Tensor

from qat.core.fake_quant import guarded
from qat.speed import fused_kernels
from qat.speed.codes import QuantizedCodes, mask_from_codes


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
    s, z = guarded(scale, zero_point, qmin, qmax)
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
    once, stays 1.0 / 0.0): PyTorch's CPU comparisons write a bool output through a much slower
    loop than a float one, and float → bool is one vectorized pass."""
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
    s, z = guarded(scale, zero_point, qmin, qmax)
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
    0.0 is multiplied by ``grad`` (:func:`_times_float_mask`), as :func:`masked_grad` does: no
    bool mask, no mixed-dtype product, the same bits."""
    s, z = guarded(scale, zero_point, qmin, qmax)
    if fused_kernels.can_fuse(x, s):
        return pass_inside(grad, fused_kernels.fake_quantize_fused(x, s, z, qmin, qmax, value=False)[1])
    inside = _with_mask_ops(x, s, z, qmin, qmax, value=False)[1]
    return pass_inside(grad, inside) if inside.dtype == torch.bool else _times_float_mask(grad, inside.to(grad.dtype))


def pass_inside(grad: Tensor, inside: Tensor) -> Tensor:
    """``grad * inside``, the straight-through gradient, with the bool mask read as ``uint8`` in
    eager mode: the same bytes and the same product, but PyTorch's CPU kernels convert a bool
    operand to float in a temporary, through a slower loop than a ``uint8`` one."""
    if torch.compiler.is_compiling() or inside.dtype != torch.bool:
        return grad * inside
    return grad * inside.view(torch.uint8)


def save_mask(ctx, inside: Tensor | None, codes: QuantizedCodes | None, *others: Tensor) -> None:
    """Save the straight-through mask (and ``others``) for the backward pass: ``inside``, or, where
    :func:`fake_quantize_with_mask` left it to the codes (None), the codes themselves, which the
    layer saves for its own backward anyway."""
    ctx.codes_range = None if inside is not None else codes.qrange
    ctx.save_for_backward(inside if inside is not None else codes.codes, *others)


def masked_grad(ctx, grad: Tensor) -> Tensor:
    """``grad`` times the mask :func:`save_mask` saved, the straight-through gradient, as a new
    tensor. From codes in eager mode, the comparison writes the mask as 1.0 / 0.0 in ``grad``'s
    dtype, which is multiplied by ``grad`` (:func:`_times_float_mask`): PyTorch's CPU kernels
    write a bool comparison, and multiply a float by a bool or ``uint8`` operand, through slower
    loops (:func:`pass_inside`)."""
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
