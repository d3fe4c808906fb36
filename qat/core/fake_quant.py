"""Fake quantization: the one definition of the math, with a training face and an export face.

The contract (docs/design/numeric-contract.md): for a scale ``s``, an integer zero point ``z``
and a code range ``[qmin, qmax]``::

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

- :class:`FakeQuantizeFunction` (training): an ``autograd.Function`` of plain tensor ops, with the
  straight-through gradient for ``x`` and LSQ / LSQ+ gradients for scale and zero point;
- ``torch.ops.qat.fake_quantize`` (export): a ``torch.library.custom_op`` that the ONNX exporter
  maps to QuantizeLinear/DequantizeLinear (:mod:`qat.export.qdq`).

:func:`fake_quantize` picks the face: the custom op while a model is exported (inside
:func:`exporting`, or whenever ``torch.export`` traces on torch ≥ 2.14), the autograd function
otherwise. Faster equivalents of the training face, bit for bit the same, live in
:mod:`qat.speed`; a :class:`~qat.core.quantizer.Quantizer` asks for them through
:mod:`qat.core.faster`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

MIN_SCALE = torch.finfo(torch.float32).eps
"""Smallest scale used: zero or tiny scales are raised to this (torch.ao observers' ``eps``)."""


def scale_floor(qmin: int, qmax: int) -> float:
    """The least scale of a code range: :data:`MIN_SCALE`, or its square for 32-bit codes. An int32
    bias's scale is the product of two guarded scales (:mod:`qat.core.bias`), which integer
    runtimes use as it is; the floor guards against a zero scale without ever changing that product."""
    return MIN_SCALE**2 if qmax - qmin >= 2**31 else MIN_SCALE


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


def guarded(scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> tuple[Tensor, Tensor | None]:
    """The scale and zero point as the math uses them: float32, the scale at least
    :func:`scale_floor` (:data:`MIN_SCALE`), the zero point rounded and clamped into ``[qmin, qmax]``
    (None stays None)."""
    z = None if zero_point is None else zero_point.float().round().clamp(qmin, qmax)
    return scale.float().clamp_min(scale_floor(qmin, qmax)), z


def host_reads_are_free(t: Tensor) -> bool:
    """True where reading a value of ``t`` on the host costs no synchronisation: on the CPU,
    outside ``torch.compile`` (where a read would break the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def integer_codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """The codes ``q = clamp(round_half_to_even(x / s) + z, qmin, qmax)``, float32 with integer
    values, for parameters already :func:`guarded` and broadcastable against ``x``."""
    return torch.clamp(torch.round(x.float() / scale) + zero_point, qmin, qmax)


def fake_quantize_math(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """The forward value, with ``scale`` and ``zero_point`` already broadcastable against ``x``."""
    s, z = guarded(scale, zero_point, qmin, qmax)
    q = integer_codes(x, s, z, qmin, qmax)
    y = (q - z) * s
    # no `.to()` when the dtype already matches: a no-op `.to` as an autograd.Function's output
    # makes Dynamo before torch 2.13 drop the custom backward's gradient (zero gradients, seen with 2.11)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class FakeQuantizeFunction(torch.autograd.Function):
    """Training face: forward = :func:`fake_quantize_math`; backward = STE + LSQ / LSQ+.

    Gradients (Esser et al. 2020, LSQ; Bhalgat et al. 2020, LSQ+; the same formulas as ATen's
    ``_fake_quantize_learnable_per_*_affine``), with ``u = x / s`` and ``q`` the clamped code:

    - ``x``: ``dy`` where ``qmin <= round(u) + z <= qmax``, else 0 (straight-through estimator);
    - ``s``: ``(q - z) - u`` inside the range, ``qmin - z`` / ``qmax - z`` outside; summed over
      the elements that share the scale and multiplied by ``grad_factor`` (LSQ's gradient
      scale ``1 / sqrt(N * qmax)``, supplied by the caller);
    - ``z``: 0 inside the range, ``-s`` outside, scaled the same way.

    It saves its inputs (and copies of the parameters, which an observer may update in place
    before the backward pass runs) and recomputes the rest in the backward pass.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):
        ctx.save_for_backward(x, scale.detach().clone(), zero_point.detach().clone())
        ctx.qrange, ctx.grad_factor = (qmin, qmax), grad_factor
        return fake_quantize_math(x, scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        s, z = guarded(scale, zero_point, qmin, qmax)
        u = x.float() / s
        code = torch.round(u) + z
        inside = (code >= qmin) & (code <= qmax)
        grad_x = grad_y * inside if ctx.needs_input_grad[0] else None
        grad_scale = grad_zero_point = None
        if ctx.needs_input_grad[1]:
            d_scale = torch.clamp(code, qmin, qmax) - z - torch.where(inside, u, 0.0)
            grad_scale = (grad_y.float() * d_scale).sum_to_size(scale.shape) * ctx.grad_factor
        if ctx.needs_input_grad[2]:
            d_zero_point = torch.where(inside, 0.0, -s)
            grad_zero_point = (grad_y.float() * d_zero_point).sum_to_size(zero_point.shape) * ctx.grad_factor
        return grad_x, grad_scale, grad_zero_point, None, None, None


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
    name: str = "",
) -> Tensor:
    """Fake-quantize ``x`` with ONNX-layout parameters; differentiable (STE, LSQ / LSQ+).

    Args:
        x: any float tensor (fp32, bf16, fp16).
        scale: float scale: ``()``, ``(C,)`` along ``axis``, or blocked (``x``'s rank).
        zero_point: same shape as ``scale``, integer-valued (a real-valued learnable zero point
            is rounded in the forward pass, straight-through in the backward pass); None for 0.
        qmin: the lowest integer code, e.g. ``-8`` for int4.
        qmax: the highest integer code, e.g. ``7`` for int4.
        axis: the per-channel or block axis (negative counts from the end).
        block_size: elements per block along ``axis``; 0 for per-tensor / per-channel.
        grad_factor: multiplies the scale and zero-point gradients (LSQ gradient scaling).
        name: the quantizer's module path, carried by the export face's op (``qat::fake_quantize``).

    Example:
        >>> import torch
        >>> from qat.core.fake_quant import fake_quantize
        >>> fake_quantize(torch.tensor([0.26, -1.0, 9.0]), torch.tensor(0.5), torch.tensor(0.0), -8, 7)
        tensor([ 0.5000, -1.0000,  3.5000])
    """
    axis = axis % x.ndim if x.ndim else 0
    zero_point = torch.zeros_like(scale) if zero_point is None else zero_point
    if export_face():
        return torch.ops.qat.fake_quantize(x, scale, zero_point, qmin, qmax, axis, block_size, name)
    x_in, s, z, restore = in_layout(x, scale, zero_point, axis, block_size)
    return restore(FakeQuantizeFunction.apply(x_in, s, z, qmin, qmax, grad_factor))


def in_layout(x: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int, block_size: int
              ) -> tuple[Tensor, Tensor, Tensor | None, Callable[[Tensor], Tensor]]:
    """``x`` and its parameters laid out to broadcast against each other (``axis`` non-negative),
    and the function that takes a result back to ``x``'s shape. Whole blocks split the axis and
    broadcast the scales rather than repeat them to ``x``'s size."""
    if block_size and scale.ndim and scale.shape[axis] > 1 and x.shape[axis] % block_size == 0:
        z = None if zero_point is None else zero_point.unsqueeze(axis + 1)
        return x.unflatten(axis, (-1, block_size)), scale.unsqueeze(axis + 1), z, lambda t: t.flatten(axis, axis + 1)
    s = broadcast_qparam(scale, x, axis, block_size)
    z = None if zero_point is None else broadcast_qparam(zero_point, x, axis, block_size)
    return x, s, z, _same


def _same(t: Tensor) -> Tensor:
    return t
