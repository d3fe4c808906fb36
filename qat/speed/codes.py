"""Integer codes: a fake-quantized value kept in one byte an element, which gives it back bit
for bit and carries its straight-through mask (:class:`QuantizedCodes`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from qat.core.fake_quant import host_reads_are_free
from qat.core.spec import integer_range

_INT8_MIN, _INT8_MAX = integer_range(8, signed=True)
_UINT8_MIN, _UINT8_MAX = integer_range(8, signed=False)


class QuantizedCodes:
    """The integer codes of one fake quantization, kept to make its value again later: one byte an
    element where the value takes four (float32) or two, for a caller that must hold the value
    until the backward pass (a quantized layer's saved operands,
    :meth:`~qat.modules.base.QuantizedLayer.recomputing`).

    Pass an empty one as ``codes=`` to :func:`~qat.speed.functions.fake_quantize_fixed`: it is filled on the PyTorch path in
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
        >>> from qat.speed.codes import QuantizedCodes, mask_from_codes
        >>> from qat.speed.functions import fake_quantize_fixed
        >>> codes = QuantizedCodes()
        >>> y = fake_quantize_fixed(torch.tensor([0.26, -1.0, 9.0]), torch.tensor(0.5), None, -8, 7, codes=codes)
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
        return qmin - 1 >= _INT8_MIN and qmax + 1 <= _INT8_MAX

    def keep(self, clamped: Tensor, s: Tensor, z: Tensor | None, dtype: torch.dtype, qmin: int, qmax: int) -> None:
        """Keep ``clamped`` (the codes as float32 before the zero point is taken off, clamped to
        ``[qmin, qmax]``, or one step wider where :meth:`carries_mask`) in a byte, with the guarded
        ``s`` and ``z`` and the value's dtype, if it can be done exactly."""
        code_dtype = (torch.int8 if qmin >= _INT8_MIN and qmax <= _INT8_MAX
                      else torch.uint8 if qmin >= _UINT8_MIN and qmax <= _UINT8_MAX else None)
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
        """The fake-quantized value, as it was returned: the codes (exact in
        float32; clamped back into the range where they are kept wider) less the zero point, times
        the scale, in float32, cast to the value's dtype. The codes are converted to float32
        first and the rest done in place: PyTorch's CPU kernels run a mixed ``int8 * float32``
        slower than the conversion and a float32 multiply together (the same numbers: the
        conversion is exact, and mixed operands are computed in float32 anyway)."""
        codes = self.codes.clamp(*self.qrange) if self.carries_mask(*self.qrange) else self.codes
        y = codes.float()
        y = y.mul_(self.scale) if self.zero_point is None else y.sub_(self.zero_point).mul_(self.scale)
        return self.restore(y if y.dtype == self.dtype else y.to(self.dtype))


def _same(t: Tensor) -> Tensor:
    return t


def mask_from_codes(codes: Tensor, qmin: int, qmax: int) -> Tensor:
    """The straight-through mask of codes kept one step wider than ``[qmin, qmax]``
    (:meth:`QuantizedCodes.carries_mask`): where clamping them into the range changes nothing.
    Compared in ``int8``, which PyTorch's CPU kernels write as ``bool`` several times faster than
    a float comparison."""
    return codes.clamp(qmin, qmax) == codes
