"""Fused Triton kernels for eager training on a GPU: the same bits as the PyTorch ops, in one pass.

In eager mode PyTorch runs each fake quantization as about eight elementwise kernels in float32
(upcast, divide, round, clamp, compare, multiply, downcast) and an observer's range of the finite
values as five (``isfinite``, two ``masked_fill``, ``amin``, ``amax``). On a GPU those passes over
every activation cost more than the layer they quantize. Two Triton kernels replace them:

- :func:`fake_quantize_fused`: value and straight-through mask of
  :func:`qat.speed.masks.fake_quantize_with_mask` in one read of ``x`` (in its own dtype) and one
  write of each output;
- :func:`finite_range_fused`: :func:`qat.core.observers.finite_range` (min and max over the finite
  values of each row) in one read.

They are used where they apply (:func:`can_fuse`): a CUDA tensor, outside ``torch.compile`` (where
Inductor fuses the PyTorch ops itself) and outside export, when Triton is installed. Everywhere
else, and as the reference in tests, the PyTorch ops run. Results are equal bit for bit: division
is IEEE round-to-nearest (``div_rn``; Triton's ``/`` is approximate), rounding is half to even,
NaN propagates as in ``torch.clamp``, subnormals are kept. The sign of a zero is kept too, which
is where PyTorch's own ops disagree between devices: ``clamp(-0.0, min=0)`` is ``-0.0`` on the
CPU and ``0.0`` on CUDA; the kernel gives the CPU's.

Set ``QAT_TRITON=0`` in the environment, or use :func:`disabled`, to run the PyTorch ops instead.
Tests without a GPU run the kernels on CPU tensors in Triton's interpreter: ``TRITON_INTERPRET=1``
set before Triton is imported, and :func:`on_cpu`.

Example:
    >>> import torch
    >>> from qat.speed.fused_kernels import can_fuse
    >>> can_fuse(torch.ones(4), torch.tensor(0.1))  # a CPU tensor: the PyTorch ops run
    False
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships with CUDA builds of torch; CPU-only installs run the PyTorch ops
    triton = None

_enabled = os.environ.get("QAT_TRITON", "1") != "0"
_devices = ("cuda",)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024
_INT32_LIMIT = 2**31 - 1
_MAX_SPLITS = 65535  # CUDA's limit on a grid's second dimension


@contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch ops instead of the fused kernels inside this block (comparisons, debugging)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


@contextmanager
def on_cpu() -> Iterator[None]:
    """Run the kernels on CPU tensors too, in Triton's interpreter, inside this block (tests).
    Needs ``TRITON_INTERPRET=1`` in the environment before Triton is first imported."""
    if triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("qat.speed.fused_kernels.on_cpu needs Triton and TRITON_INTERPRET=1 set before Triton is imported")
    global _devices
    previous, _devices = _devices, ("cuda", "cpu")
    try:
        yield
    finally:
        _devices = previous


def _usable(x: Tensor) -> bool:
    return (
        _enabled
        and triton is not None
        and type(x) in (torch.Tensor, torch.nn.Parameter)  # not a FakeTensor, FunctionalTensor, DTensor…
        and x.device.type in _devices
        and x.dtype in _FLOAT_DTYPES
        and x.numel() > 0
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
    )


def scale_layout(x_shape: torch.Size, scale_shape: torch.Size) -> tuple[int, int] | None:
    """``(groups, inner)`` such that element ``i`` of a contiguous ``x`` uses scale
    ``(i // inner) % groups``, for a scale that broadcasts against ``x``; None for a layout the
    kernel does not index (scale dimensions that are not one run of ``x``'s dimensions)."""
    if len(scale_shape) > len(x_shape):
        return None
    padded = (1,) * (len(x_shape) - len(scale_shape)) + tuple(scale_shape)
    varying = [d for d, n in enumerate(padded) if n != 1]
    if not varying:
        return 1, 1
    first, end = varying[0], varying[-1] + 1
    if any(padded[d] != x_shape[d] for d in range(first, end)):
        return None
    return math.prod(x_shape[first:end]), math.prod(x_shape[end:])


def can_fuse(x: Tensor, scale: Tensor) -> bool:
    """True where :func:`fake_quantize_fused` runs for ``x`` and a scale broadcastable to it."""
    return _usable(x) and scale.device == x.device and scale_layout(x.shape, scale.shape) is not None


def can_fuse_rows(rows: Tensor) -> bool:
    """True where :func:`finite_range_fused` runs for ``rows``."""
    return _usable(rows) and rows.ndim > 0 and rows.shape[-1] > 0


def _launch_device(x: Tensor) -> AbstractContextManager:
    # Triton launches on the current CUDA device; a tensor on another one needs it made current
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return nullcontext()


def fake_quantize_fused(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, *, value: bool = True, mask: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`qat.speed.masks.fake_quantize_with_mask` in one kernel: ``(y, inside)``, each None
    when not asked for (``value`` / ``mask``). ``scale`` (float32, at least ``MIN_SCALE``) and
    ``zero_point`` (float32, integer-valued, within ``[qmin, qmax]``; None for 0) are already
    guarded and broadcast against ``x``: check :func:`can_fuse` first."""
    groups, inner = scale_layout(x.shape, scale.shape)
    s = scale.contiguous()
    z = None if zero_point is None else zero_point.contiguous()
    y = torch.empty_like(x) if value else None
    inside = torch.empty(x.shape, dtype=torch.bool, device=x.device) if mask else None
    n = x.numel()
    with _launch_device(x):
        _fake_quantize_kernel[(triton.cdiv(n, _BLOCK),)](
            x, s, s if z is None else z, x if y is None else y, x if inside is None else inside,
            n, groups, inner, float(qmin), float(qmax),
            HAS_ZERO_POINT=z is not None, PER_TENSOR=groups == 1, WRITE_VALUE=value, WRITE_MASK=mask,
            INT64=n > _INT32_LIMIT, BLOCK=_BLOCK,
        )  # fmt: skip
    return y, inside


def finite_range_fused(rows: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`qat.core.observers.finite_range` in one read of ``rows`` (any float dtype, contiguous):
    float32 min and max of each row's finite values over the last dimension (``+inf, -inf`` for
    a row with none). Each program reduces a slice of a row; a second, tiny ``amin``/``amax``
    combines the slices."""
    k = rows.shape[-1]
    flat = rows.view(-1, k)
    split = min(triton.next_power_of_2(k), 16 * _BLOCK)
    split = max(split, triton.next_power_of_2(triton.cdiv(k, _MAX_SPLITS)))
    n_splits = triton.cdiv(k, split)
    low = torch.empty(flat.shape[0], n_splits, dtype=torch.float32, device=rows.device)
    high = torch.empty_like(low)
    with _launch_device(rows):
        _finite_range_kernel[(flat.shape[0], n_splits)](
            flat, low, high, k, SPLIT=split, BLOCK=min(split, _BLOCK), INT64=rows.numel() > _INT32_LIMIT
        )
    shape = rows.shape[:-1]
    if n_splits == 1:
        return low.view(shape), high.view(shape)
    return low.amin(-1).view(shape), high.amax(-1).view(shape)


if triton is not None:

    @triton.jit
    def _round_half_to_even(v):
        # torch.round without libdevice (which Triton's interpreter lacks): adding and subtracting
        # 2**23 leaves the nearest integer, ties to even, for |v| < 2**23 (IEEE round-to-nearest);
        # larger floats are integers already. The sign bit is copied back so -0.3 gives -0.0.
        a = tl.abs(v)
        r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
        sign = v.to(tl.uint32, bitcast=True) & 0x80000000
        return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_float32(ptr, mask):
        # bf16 → fp32 on the bits (exact: the bf16 bits are the fp32's top half): Triton's
        # interpreter loses bf16 subnormals in `.to(tl.float32)`, so the tests could not check it
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
            return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store_as(ptr, v, mask):
        # fp32 → bf16 by hand, round to nearest even on the bits: Triton's interpreter truncates in
        # `.to(tl.bfloat16)`, so the tests could not check the conversion; integer RTNE is the same
        # on every backend (NaN stays NaN)
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(v != v, 0x7FC0, rounded)
            tl.store(ptr, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fake_quantize_kernel(
        x_ptr, s_ptr, z_ptr, y_ptr, mask_ptr, n, groups, inner, qmin, qmax,
        HAS_ZERO_POINT: tl.constexpr, PER_TENSOR: tl.constexpr, WRITE_VALUE: tl.constexpr,
        WRITE_MASK: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        if INT64:
            pid = pid.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        x = _load_float32(x_ptr + offs, valid)
        if PER_TENSOR:
            s = tl.load(s_ptr)
        else:
            group = (offs // inner) % groups
            s = tl.load(s_ptr + group, mask=valid, other=1.0)
        code = _round_half_to_even(tl.math.div_rn(x, s))
        if HAS_ZERO_POINT:
            if PER_TENSOR:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
                z = tl.load(z_ptr)
            else:
                z = tl.load(z_ptr + group, mask=valid, other=0.0)
            code = code + z
        # comparisons rather than minimum/maximum: NaN stays NaN, as in torch.clamp
        clamped = tl.where(code < qmin, qmin, tl.where(code > qmax, qmax, code))
        if WRITE_MASK:
            tl.store(mask_ptr + offs, clamped == code, mask=valid)
        if WRITE_VALUE:
            if HAS_ZERO_POINT:
                clamped = clamped - z
            _store_as(y_ptr + offs, clamped * s, valid)

    @triton.jit
    def _finite_range_kernel(x_ptr, low_ptr, high_ptr, k, SPLIT: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
        row = tl.program_id(0)
        part = tl.program_id(1)
        if INT64:
            row = row.to(tl.int64)
            part = part.to(tl.int64)
        row_start = x_ptr + row * k
        low = tl.full([BLOCK], float("inf"), tl.float32)
        high = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, SPLIT, BLOCK):
            offs = part * SPLIT + start + tl.arange(0, BLOCK)
            inside = offs < k
            v = _load_float32(row_start + offs, inside)
            finite = inside & (tl.abs(v) < float("inf"))  # False for NaN and ±inf
            low = tl.minimum(low, tl.where(finite, v, float("inf")))
            high = tl.maximum(high, tl.where(finite, v, float("-inf")))
        out = row * tl.num_programs(1) + part
        tl.store(low_ptr + out, tl.min(low, axis=0))
        tl.store(high_ptr + out, tl.max(high, axis=0))
