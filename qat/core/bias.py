"""The bias as integer runtimes add it: int32 codes at ``input_scale × weight_scale``.

A layer whose input and weight are quantized runs on an integer runtime (ONNX Runtime's
QLinearConv and QGemm, QNN, TFLite) as an integer accumulation ``Σ (x_q − z_x)(w_q − z_w)``, to
which the bias is added as int32 codes on the accumulator's own grid: scale ``s_x · s_w`` (one per
output channel when the weight has one per channel), zero point 0. The bias the device adds is
therefore ``round(b / (s_x · s_w)) · s_x · s_w``, not ``b``. With 4-bit weights that grid is
coarse enough to move a layer's outputs by more than float rounding ever does, and the moved values
flip activation codes further down; ONNX Runtime makes the same int32 bias from a float one on its
own (its ``WeightBiasQuantization`` pass). So QAT fake-quantizes the bias on that grid
(:class:`BiasQuantizer`), with a straight-through gradient for the bias and the fake quantization's
scale gradient for ``s_x · s_w``, which reaches learnable input and weight scales through the
product; the exporter writes the same int32 codes (:mod:`qat.export.qdq`), so no runtime pass
changes a number.

The codes span ``±(2³¹ − 128)``, the widest range whose ends float32 holds exactly (the math runs
in float32); a bias that reaches it is 2³¹ steps of its grid, which a trained layer never is.

Example:
    >>> import torch
    >>> from qat import QuantSpec
    >>> from qat.core.bias import BiasQuantizer
    >>> from qat.core.quantizer import Quantizer
    >>> x_q = Quantizer(QuantSpec(bits=8), role="activation")
    >>> w_q = Quantizer(QuantSpec(bits=4, granularity="per_channel"), shape=(2, 3), role="weight")
    >>> _ = x_q.scale.fill_(0.1), w_q.scale.copy_(torch.tensor([0.01, 0.02]))
    >>> BiasQuantizer()(torch.tensor([0.0123, -0.0071]), x_q, w_q)  # steps of 0.001 and 0.002
    tensor([ 0.0120, -0.0080])
"""

from __future__ import annotations

from torch import Tensor, nn

from qat.core.fake_quant import fake_quantize, guarded
from qat.core.quantizer import Quantizer
from qat.core.snapshot import snapshot
from qat.core.spec import Granularity, QuantSpec

BIAS_QMIN, BIAS_QMAX = -(2**31) + 128, 2**31 - 128
"""The int32 bias codes: the widest symmetric range whose ends are exact in float32."""


def int32_bias_fits(weight: QuantSpec | None, weight_axis: int | None, channel_axis: int, activation: QuantSpec | None) -> bool:
    """Whether a layer with these specs has an int32 bias on an integer runtime: its input has one
    fixed scale (per tensor, not per token) and its weight one scale per tensor or per output
    channel (``weight_axis`` the weight quantizer's axis, ``channel_axis`` the layer's output
    channel axis). Blocked weights (an LLM's MatMulNBits) and per-token inputs keep a float bias."""
    if weight is None or activation is None or weight.dynamic or not activation.per_tensor_static:
        return False
    return weight.granularity is Granularity.PER_TENSOR or (weight.granularity is Granularity.PER_CHANNEL and weight_axis == channel_axis)


def bias_scale(input_quantizer: Quantizer, weight_quantizer: Quantizer) -> Tensor:
    """``s_x · s_w``: the bias grid, ``()`` or one per output channel, from the two scales as the
    fake quantization uses them (guarded, float32), differentiable in both."""
    s_x = guarded(snapshot(input_quantizer.scale), None, input_quantizer.spec.qmin, input_quantizer.spec.qmax)[0]
    s_w = guarded(snapshot(weight_quantizer.scale), None, weight_quantizer.spec.qmin, weight_quantizer.spec.qmax)[0]
    return s_x * s_w


class BiasQuantizer(nn.Module):
    """Fake-quantize a layer's bias to int32 at its input's scale times its weight's scale.

    Stateless: the grid comes from the layer's two quantizers at each call, so it follows their
    calibration and training. It acts while both fake-quantize (in calibration, the bias stays
    float, as the input and weight do).
    """

    export_name: str = ""
    """Module path in the model being exported (as :attr:`Quantizer.export_name
    <qat.core.quantizer.Quantizer.export_name>`): the exporter names the bias's tensors after it."""

    def forward(self, bias: Tensor, input_quantizer: Quantizer, weight_quantizer: Quantizer) -> Tensor:
        if not (input_quantizer.fake_quant_enabled and weight_quantizer.fake_quant_enabled):
            return bias
        scale = bias_scale(input_quantizer, weight_quantizer)
        return fake_quantize(bias, scale, None, BIAS_QMIN, BIAS_QMAX, axis=0, name=self.export_name)

    def extra_repr(self) -> str:
        return "int32, scale = input scale × weight scale"
