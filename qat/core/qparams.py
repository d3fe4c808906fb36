"""From an observed range to a scale and zero point.

Kept apart from the observers (which only collect statistics) so that every path — static
observers, MSE search, dynamic per-token scales — computes scales the same way. The formulas are
torch.ao's (``UniformQuantizationObserverBase._calculate_qparams``), so ranges observed by either
library give the same numbers:

- the range is widened to include 0 (so 0 is exactly representable);
- symmetric: ``s = max(-min, max) / ((qmax - qmin) / 2)``, zero point 0 (signed) or the mid-point
  code ``2**(bits-1)`` (unsigned; torch.ao's 128 for uint8);
- symmetric with :attr:`~qat.core.spec.QuantSpec.extreme_on_grid`: ``s = max(-min, max) /
  2**(bits-1)``, the zero point the symmetric one, or one below it where ``max > -min``, so the
  largest-magnitude value is exactly the outer level ``∓2**(bits-1) · s``;
- affine: ``s = (max - min) / (qmax - qmin)``, ``z = clamp(qmin - round(min / s), qmin, qmax)``;
- ``s`` is at least :data:`~qat.core.fake_quant.MIN_SCALE`, so an all-zero or never-observed tensor
  (range ``+inf, -inf``) still gives a finite scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qat.core.fake_quant import MIN_SCALE
from qat.core.spec import QuantSpec


def qparams_from_range(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point (both float32, integer-valued zero point) for an observed range.

    Example:
        >>> import torch
        >>> from qat import QuantSpec
        >>> from qat.core.qparams import qparams_from_range
        >>> qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(bits=8, signed=False, symmetric=False))
        (tensor(0.0157), tensor(64.))
        >>> w4 = QuantSpec(bits=4, extreme_on_grid=True)  # 4.0 is the outer level: (7 - (-1)) · 0.5
        >>> qparams_from_range(torch.tensor(-1.0), torch.tensor(4.0), w4)
        (tensor(0.5000), tensor(-1.))
    """
    # clamps rather than minimum / maximum against a new zero tensor: one op less, and the same
    # numbers (a zero's sign, the one thing that could differ, cancels in the formulas below)
    min_neg = min_val.float().clamp(max=0.0)
    max_pos = max_val.float().clamp(min=0.0)
    if spec.extreme_on_grid:
        scale = (torch.maximum(-min_neg, max_pos) / 2 ** (spec.bits - 1)).clamp_min(MIN_SCALE)
        zero_point = spec.symmetric_zero_point - (max_pos > -min_neg).float()
    elif spec.symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = (amax / ((spec.qmax - spec.qmin) / 2)).clamp_min(MIN_SCALE)
        zero_point = torch.full_like(scale, float(spec.symmetric_zero_point))
    else:
        scale = ((max_pos - min_neg) / (spec.qmax - spec.qmin)).clamp_min(MIN_SCALE)
        zero_point = (spec.qmin - torch.round(min_neg / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point
