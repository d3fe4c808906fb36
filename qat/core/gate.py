"""The hard gate ``relu6(x + 3) / 6`` on a fixed 8-bit grid, as an integer runtime computes it.

Hardswish is ``x · relu6(x + 3) / 6`` and Hardsigmoid is ``relu6(x + 3) / 6``. Between two
quantized tensors ONNX Runtime has no integer kernel for either: it dequantizes, runs them in
float and quantizes again, several passes over the largest tensors of a MobileNetV3. Written with
the gate on a fixed grid, ``g = Q(x + 3) / 6`` with codes 0…255 at scale 6/255 (so the clamp to
``[0, 6]`` is the quantization's own), a Hardswish is an integer addition and an integer
multiplication, ``QLinearAdd`` and ``QLinearMul``, which ONNX Runtime fuses from the graph's
``Add → Q → DQ`` and ``Mul → Q`` (:func:`qat.export.ort_layout.integer_gates`).

The grid is fixed, not observed: it depends on nothing but the function, so there is nothing to
calibrate or learn. Its gradient is the hard gate's own (``1/6`` inside ``x ∈ [-3, 3]``, 0
outside), through the fake quantization's straight-through estimator.

Example:
    >>> import torch
    >>> from qat.core.gate import GateQuantizer
    >>> GateQuantizer()(torch.tensor([-4.0, 0.0, 0.01, 4.0]))  # relu6(x + 3) / 6, on steps of 1/255
    tensor([0.0000, 0.5020, 0.5020, 1.0000])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qat.core.fake_quant import fake_quantize

GATE_QMIN, GATE_QMAX = 0, 255
GATE_SHIFT = 3.0
GATE_RANGE = 6.0
"""``relu6(x + GATE_SHIFT)`` spans ``[0, GATE_RANGE]``, quantized to codes ``GATE_QMIN…GATE_QMAX``."""


class GateQuantizer(nn.Module):
    """``Q(x + 3) / 6``: ``relu6(x + 3) / 6`` with ``relu6(x + 3)`` fake-quantized to uint8 codes at
    scale 6/255, zero point 0. Stateless: the grid is a non-persistent buffer (it follows the
    module's device, and checkpoints do not hold it)."""

    export_name: str = ""
    """This module's path while the model is exported, carried into the graph (as for
    :class:`~qat.core.quantizer.Quantizer`)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(GATE_RANGE / GATE_QMAX), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        shifted = fake_quantize(x + GATE_SHIFT, self.scale, None, GATE_QMIN, GATE_QMAX, name=self.export_name)
        return shifted / GATE_RANGE
