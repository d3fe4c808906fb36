"""Hardswish and Hardsigmoid as integer runtimes compute them between quantized tensors.

With ``activation`` in the recipe's ``operators``, :func:`qat.prepare` quantizes a Hardswish's
input and output and swaps every ``nn.Hardswish`` module for :class:`QuantHardswish`, which
computes ``x · g`` with the gate ``g = relu6(x + 3) / 6`` on a fixed 8-bit grid
(:class:`~qat.core.gate.GateQuantizer`); an ``nn.Hardsigmoid`` becomes :class:`QuantHardsigmoid`,
the gate alone, whose output needs no other quantizer. The exported graph then holds an integer
addition and multiplication that ONNX Runtime runs as QLinearAdd and QLinearMul, instead of a
float activation between a dequantize and a quantize. The gate's rounding (at most half a step of
1/255) is part of what training sees.

Example:
    >>> import torch
    >>> from qat.modules.activation import QuantHardswish
    >>> x = torch.linspace(-4, 4, 9)
    >>> (QuantHardswish()(x) - torch.nn.functional.hardswish(x)).abs().max() < 4 / 255
    tensor(True)
"""

from __future__ import annotations

from torch import Tensor, nn

from qat.core.gate import GateQuantizer


class QuantizedActivation(nn.Module):
    """An activation computed with a fixed-grid gate; :meth:`to_float` gives the float module back."""

    float_cls: type[nn.Module]
    output_on_grid: bool = False
    """True when the output is the gate itself, on its fixed 8-bit grid (nothing to quantize after)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_quantizer = GateQuantizer()

    def to_float(self) -> nn.Module:
        return self.float_cls()


class QuantHardswish(QuantizedActivation):
    """``x · Q(x + 3) / 6``: Hardswish with its gate on the fixed 8-bit grid."""

    float_cls = nn.Hardswish

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate_quantizer(x)


class QuantHardsigmoid(QuantizedActivation):
    """``Q(x + 3) / 6``: Hardsigmoid on the fixed 8-bit grid."""

    float_cls = nn.Hardsigmoid
    output_on_grid = True

    def forward(self, x: Tensor) -> Tensor:
        return self.gate_quantizer(x)


ACTIVATION_TWINS: dict[type[nn.Module], type[QuantizedActivation]] = {t.float_cls: t for t in (QuantHardswish, QuantHardsigmoid)}
"""Float activation type → its gated twin (exact types only, as for layers)."""
