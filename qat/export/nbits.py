"""Quantized weights in ONNX Runtime's blocked n-bit layout: MatMulNBits and GatherBlockQuantized.

Both contrib operators store a matrix as rows of blocks along its input dimension ``K``: per row
``n`` and block ``b``, ``block_size`` unsigned codes packed into bytes (two 4-bit codes per
byte, low nibble first), one float scale and one unsigned zero point (packed the same way; left
out when every zero point is the type's mid-point, the operators' default). Element ``k`` of row
``n`` is ``(code - zero_point) * scale``.

:func:`blocked_weight` writes a quantizer's own numbers (:meth:`qat.core.quantizer.Quantizer.codes`)
into that layout without changing one value:

- signed codes move into the unsigned container by adding its mid-point (int4 ``q``, ``z`` →
  uint4 ``q + 8``, ``z + 8``), which leaves ``q - z`` unchanged;
- 2- and 3-bit codes are stored in 4-bit containers, 5- to 7-bit ones in 8-bit containers;
- per-channel and per-tensor scales, and groups larger than the block, repeat their scale in
  every block they cover: the block size only has to divide the group (:func:`block_size_for`);
- with ``extreme_on_grid`` every zero point is the mid-point or one below it; a block one below is
  stored with mirrored codes and a negative scale (the same values), so no zero points are stored
  at all, as in ONNX Runtime's own int4 files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from torch import Tensor

from qat.core.quantizer import Quantizer
from qat.core.spec import Granularity, integer_range
from qat.errors import QATError

BLOCK_SIZES = (16, 32, 64, 128, 256)
"""The block sizes MatMulNBits takes (powers of two from 16)."""


@dataclass(frozen=True)
class BlockedWeight:
    """A ``(N, K)`` matrix in MatMulNBits layout.

    Attributes:
        codes: uint8 ``(N, n_blocks, block_size * bits / 8)``, packed.
        scales: float32 ``(N, n_blocks)`` (negative for a mirrored block).
        zero_points: uint8 ``(N, ceil(n_blocks * bits / 8))``, packed; None when all are the default.
        bits: the container's width, 4 or 8.
        block_size: elements of ``K`` per block.
        k: the input dimension (the last block may be padded past it).
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def rows(self) -> np.ndarray:
        """The packed codes as GatherBlockQuantized reads them: uint8 ``(N, n_blocks * block_size * bits / 8)``."""
        return self.codes.reshape(self.n, -1)

    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def container_bits(bits: int) -> int:
    """4 for codes of up to 4 bits, else 8: the widths both operators take."""
    return 4 if bits <= 4 else 8


def block_size_for(layer: str, quantizer: Quantizer, k: int, activation_block: int | None) -> int:
    """The MatMulNBits block size for a layer's weight: the activation blocks' size when the
    layer's input is quantized in blocks (the operator quantizes its input per weight block), else
    the group size for groups, else the largest of :data:`BLOCK_SIZES` that divides ``k`` (or 32).

    Raises QATError, naming the layer, when the group size is not a multiple of the block size.
    """
    spec = quantizer.spec
    group = spec.group_size if spec.granularity is Granularity.PER_GROUP else None
    if activation_block is not None:
        block = activation_block
        if block not in BLOCK_SIZES:
            raise QATError(f"layer `{layer}`: MatMulNBits quantizes its input in blocks of {', '.join(map(str, BLOCK_SIZES))}; "
                           f"the input quantizer's group_size is {block}")
    elif group is not None:
        block = max((b for b in BLOCK_SIZES if group % b == 0), default=0)
    else:
        block = max((b for b in BLOCK_SIZES if k % b == 0), default=32)
    if group is not None and (block == 0 or group % block):
        raise QATError(f"layer `{layer}`: weight group_size {group} is not a multiple of a MatMulNBits block size "
                       f"({', '.join(map(str, BLOCK_SIZES))}{'' if activation_block is None else f'; the input blocks are {block}'})")
    return block


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis: two 4-bit codes per byte, low nibble first."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def blocked_weight(layer: str, weight: Tensor, quantizer: Quantizer, block_size: int) -> BlockedWeight:
    """``weight`` ``(N, K)`` (a Linear's or an embedding table's) as ``quantizer`` quantizes it, in
    MatMulNBits layout with ``block_size`` (:func:`block_size_for`)."""
    spec = quantizer.spec
    if weight.ndim != 2 or (quantizer.axis != (0 if spec.granularity is Granularity.PER_CHANNEL else 1) and quantizer.scale.ndim):
        raise QATError(f"layer `{layer}`: blocked storage needs a (out, in) weight with per-channel scales along out "
                       f"or groups along in; got shape {tuple(weight.shape)}, axis {quantizer.axis}")
    codes, scale, zero_point = (t.cpu().numpy() for t in quantizer.codes(weight.detach().float()))
    n, k = codes.shape
    bits = container_bits(spec.bits)
    offset = integer_range(bits, True)[1] + 1 if spec.signed else 0  # signed → unsigned container
    n_blocks = math.ceil(k / block_size)
    pad = n_blocks * block_size - k
    starts = np.arange(n_blocks) * block_size
    block_scale, block_zero = scale[:, starts], zero_point[:, starts]
    each = np.repeat(np.arange(n_blocks), block_size)[:k]
    if not (np.array_equal(scale, block_scale[:, each]) and np.array_equal(zero_point, block_zero[:, each])):
        raise QATError(f"layer `{layer}`: the weight's scales change inside a block of {block_size}")
    unsigned = codes + offset
    if pad:  # the padding dequantizes to 0
        unsigned = np.concatenate([unsigned, np.repeat(block_zero[:, -1:] + offset, pad, axis=1)], axis=1)
    unsigned = unsigned.reshape(n, n_blocks, block_size)
    zero = block_zero + offset
    block_scale = block_scale.astype(np.float32)
    default = 2 ** (bits - 1)
    below = zero == default - 1
    if np.isin(zero, (default, default - 1)).all() and below.any():
        # extreme_on_grid: a block whose zero point is one below the mid-point holds the same values
        # with its codes mirrored and its scale negated, (top - q - mid)·(-s) = (q - (mid - 1))·s, so
        # every zero point is the default and none is stored (ONNX Runtime's own int4 rule, its layout)
        top = 2**bits - 1
        unsigned = np.where(below[..., None], top - unsigned, unsigned)
        block_scale = np.where(below, -block_scale, block_scale)
        zero = np.full_like(zero, default)
    zero_points = None if (zero == default).all() else _pack(zero, bits)
    return BlockedWeight(_pack(unsigned, bits), block_scale, zero_points, bits, block_size, k)


def concatenate(weights: list[BlockedWeight]) -> BlockedWeight:
    """Stack blocked weights of one ``K``, bit width and block size along ``N`` (fused q/k/v)."""
    first = weights[0]
    if any((w.k, w.bits, w.block_size) != (first.k, first.bits, first.block_size) for w in weights):
        raise QATError("blocked weights of different widths or block sizes cannot be fused")
    zero_points = None
    if any(w.zero_points is not None for w in weights):
        n_blocks = first.scales.shape[1]
        default = np.full((1, n_blocks), 2 ** (first.bits - 1), np.uint8)
        zero_points = np.concatenate([w.zero_points if w.zero_points is not None else _pack(np.repeat(default, w.n, 0), w.bits)
                                      for w in weights])
    return replace(first, codes=np.concatenate([w.codes for w in weights]), scales=np.concatenate([w.scales for w in weights]),
                   zero_points=zero_points)
