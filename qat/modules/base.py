"""`QuantizedLayer`: what every quantized twin of a float layer shares.

A twin is the float layer's own state (the same ``Parameter`` objects, so optimizers, tied
weights and references held elsewhere stay valid) under a subclass whose forward fake-quantizes
the weight and, optionally, the layer's input and bias. It owns up to three children:

- ``weight_quantizer``: sized from the weight, with the layer's channel axis for ``per_channel``
  and its input axis for ``per_group`` (:attr:`channel_axis` / :attr:`input_axis`);
- ``input_quantizer``: a static or per-token activation quantizer, or None;
- ``bias_quantizer``: the bias as int32 codes at input scale × weight scale, as integer runtimes
  add it (:mod:`qat.core.bias`), or None (no int32 bias: the recipe's ``bias: float``, a per-token
  input, blocked weights).

``from_float`` builds a twin without re-running the float layer's constructor (whose arguments
vary by layer and may come from a subclass); ``to_float`` goes back, with the fake-quantized
weight baked in (what :func:`qat.strip` returns).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
from torch import Tensor, nn

from qat.core import faster
from qat.core.bias import BiasQuantizer, int32_bias_fits
from qat.core.quantizer import Quantizer
from qat.core.spec import Granularity, QuantSpec

QUANT_CHILDREN = ("weight_quantizer", "input_quantizer", "bias_quantizer")


class QuantizedLayer(nn.Module):
    """Mixin for quantized twins; list it first: ``class QuantLinear(QuantizedLayer, nn.Linear)``."""

    float_cls: ClassVar[type[nn.Module]]
    channel_axis: ClassVar[int] = 0
    """Weight axis of the output channels (per-channel scales run along it)."""
    input_axis: ClassVar[int] = 1
    """Weight axis of the input features (per-group blocks run along it)."""
    takes_activation: ClassVar[bool] = True
    """False for layers whose input is not a float tensor (embeddings take indices)."""
    saves_operands: ClassVar[bool] = True
    """False for layers whose op saves neither its input nor its weight for the backward pass
    (an embedding saves its indices): nothing to keep as codes."""

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    bias_quantizer: BiasQuantizer | None
    input_from: tuple[Quantizer, ...] = ()
    """The quantizer that quantizes this layer's input where it is produced, when the layer gave its
    own up (the recipe's ``residuals``): the bias grid reads its scale. A tuple, so that it is not
    registered as a second parent's child."""
    recompute_operands: bool = False
    """Recompute the quantized input and weight in the backward pass instead of saving them
    (:func:`qat.set_recompute`): less memory, more elementwise work."""
    save_codes: bool = True
    """Save the quantized input and weight that the layer's op keeps for its backward pass as
    one-byte integer codes instead of float copies, and make them again from the codes there
    (:func:`qat.set_save_codes`): the same values, a quarter of the memory of float32."""

    @classmethod
    def from_float(cls, layer: nn.Module, weight: QuantSpec | None, activation: QuantSpec | None,
                   int32_bias: bool = False) -> QuantizedLayer:
        """A twin of ``layer`` sharing its parameters, buffers, submodules and hooks; with
        ``int32_bias``, its bias is fake-quantized as integer runtimes add it, where the specs
        allow (:func:`qat.core.bias.int32_bias_fits`)."""
        twin = cls.__new__(cls)
        twin.__dict__.update(layer.__dict__)
        twin._modules = dict(layer._modules)  # own dict: adding quantizers must not touch `layer`
        for child in QUANT_CHILDREN:
            twin.register_module(child, None)
        if weight is not None:
            grouped = weight.granularity is Granularity.PER_GROUP
            axis = cls.input_axis if grouped else cls.channel_axis
            twin.weight_quantizer = Quantizer(weight, layer.weight.shape, "weight", default_axis=axis).to(layer.weight.device)
        if activation is not None and cls.takes_activation:
            twin.input_quantizer = Quantizer(activation, role="activation").to(layer.weight.device)
        weight_axis = twin.weight_quantizer.axis if twin.weight_quantizer is not None else None
        if int32_bias and cls.takes_activation and twin.bias_channels_align() \
                and int32_bias_fits(weight, weight_axis, cls.channel_axis, activation):
            twin.bias_quantizer = BiasQuantizer()
        return twin

    def bias_channels_align(self) -> bool:
        """Whether the bias has one entry per weight channel, so per-channel weight scales give
        its grid (a grouped transposed convolution's do not)."""
        return True

    def quantize_bias(self, bias: Tensor | None) -> Tensor | None:
        """``bias`` on the int32 grid of this layer's input and weight scales, when the layer has a
        bias quantizer and both quantize; otherwise ``bias`` itself."""
        source = self.input_quantizer if self.input_quantizer is not None else next(iter(self.input_from), None)
        if bias is None or self.bias_quantizer is None or source is None or self.weight_quantizer is None:
            return bias
        return self.bias_quantizer(bias, source, self.weight_quantizer)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The layer's input, fake-quantized when an input quantizer is set. The speed wing
        (:mod:`qat.core.faster`) may keep it for the layer's backward pass as integer codes, or
        recompute it there (:attr:`recompute_operands`; the layer keeps ``x`` then, so the
        quantizer's backward uses ``x`` too instead of saving a mask)."""
        if self.input_quantizer is None:
            return x
        wing = faster.wing()
        return self.input_quantizer(x) if wing is None else wing.quantize_operand(self, self.input_quantizer, x, None, keepable=True)

    def quantize_weight(self, weight: Tensor, factor: Tensor | None = None) -> Tensor:
        """``weight`` (times ``factor``, a folded BatchNorm's, when given) through the weight
        quantizer, if any. While recomputing, the layer's own unfolded weight (a parameter, alive
        all along) is what the quantizer's backward keeps instead of a mask."""
        if self.weight_quantizer is None:
            return weight if factor is None else weight * factor
        wing = faster.wing()
        if wing is None:
            return self.weight_quantizer(weight, factor)
        return wing.quantize_operand(self, self.weight_quantizer, weight, factor, keepable=factor is None and weight is self.weight)

    def recomputing(self, x: Tensor, x_q: Tensor, w_q: Tensor, weight_factor: Tensor | None = None) -> AbstractContextManager:
        """Context for the layer's own op (conv, matmul), in which the speed wing saves the
        quantized input ``x_q`` (made from ``x``) and weight ``w_q`` (made from the layer's weight,
        times ``weight_factor`` when BatchNorm is folded) as integer codes, or recomputes them in
        the backward pass (:attr:`recompute_operands`); a no-op on the plain path."""
        wing = faster.wing()
        return nullcontext() if wing is None else wing.recomputing(self, x, x_q, w_q, weight_factor)

    def float_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """The float weight and bias the weight quantizer sees in inference (folded, for conv+BN)."""
        return self.weight, self.bias

    @torch.no_grad()
    def inference_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Fake-quantized weight (current scales, no observation) and the float bias: what the
        layer computes without input quantization (an int32 bias needs a quantized input)."""
        weight, bias = self.float_weight_bias()
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer.fake_quantize(weight)
        return weight, bias

    def to_float(self) -> nn.Module:
        """A plain ``float_cls`` layer computing what this twin computes in eval mode, without
        activation quantization: the fake-quantized (and folded) weight baked in."""
        weight, bias = self.inference_weight_bias()
        layer = self.float_cls.__new__(self.float_cls)
        twin_only = {*self.twin_attributes(), "recompute_operands", "save_codes", "input_from"}
        layer.__dict__.update({k: v for k, v in self.__dict__.items() if k not in twin_only})
        layer._modules = {k: v for k, v in self._modules.items() if k not in self.twin_children()}
        layer._parameters = dict(self._parameters)
        trainable = self.weight.requires_grad
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=trainable)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=trainable)
        return layer

    def twin_children(self) -> tuple[str, ...]:
        """Submodules the twin adds to the float layer (dropped by :meth:`to_float`)."""
        return QUANT_CHILDREN

    def twin_attributes(self) -> tuple[str, ...]:
        """Plain attributes the twin adds to the float layer (dropped by :meth:`to_float`)."""
        return ()

