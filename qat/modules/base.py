"""`QuantizedLayer`: what every quantized twin of a float layer shares.

A twin is the float layer's own state (the same ``Parameter`` objects, so optimizers, tied
weights and references held elsewhere stay valid) under a subclass whose forward fake-quantizes
the weight and, optionally, the layer's input. It owns two child quantizers:

- ``weight_quantizer``: sized from the weight, with the layer's channel axis for ``per_channel``
  and its input axis for ``per_group`` (:attr:`channel_axis` / :attr:`input_axis`);
- ``input_quantizer``: a static or per-token activation quantizer, or None.

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
from qat.core.quantizer import Quantizer
from qat.core.spec import Granularity, QuantSpec

QUANT_CHILDREN = ("weight_quantizer", "input_quantizer")


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
    recompute_operands: bool = False
    """Recompute the quantized input and weight in the backward pass instead of saving them
    (:func:`qat.set_recompute`): less memory, more elementwise work."""
    save_codes: bool = True
    """Save the quantized input and weight that the layer's op keeps for its backward pass as
    one-byte integer codes instead of float copies, and make them again from the codes there
    (:func:`qat.set_save_codes`): the same values, a quarter of the memory of float32."""

    @classmethod
    def from_float(cls, layer: nn.Module, weight: QuantSpec | None, activation: QuantSpec | None) -> QuantizedLayer:
        """A twin of ``layer`` sharing its parameters, buffers, submodules and hooks."""
        twin = cls.__new__(cls)
        twin.__dict__.update(layer.__dict__)
        twin._modules = dict(layer._modules)  # own dict: adding quantizers must not touch `layer`
        twin.register_module("weight_quantizer", None)
        twin.register_module("input_quantizer", None)
        if weight is not None:
            grouped = weight.granularity is Granularity.PER_GROUP
            axis = cls.input_axis if grouped else cls.channel_axis
            twin.weight_quantizer = Quantizer(weight, layer.weight.shape, "weight", default_axis=axis).to(layer.weight.device)
        if activation is not None and cls.takes_activation:
            twin.input_quantizer = Quantizer(activation, role="activation").to(layer.weight.device)
        return twin

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
        """Fake-quantized weight (current scales, no observation) and bias, as deployed."""
        weight, bias = self.float_weight_bias()
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer.fake_quantize(weight)
        return weight, bias

    def to_float(self) -> nn.Module:
        """A plain ``float_cls`` layer computing what this twin computes in eval mode, without
        activation quantization: the fake-quantized (and folded) weight baked in."""
        weight, bias = self.inference_weight_bias()
        layer = self.float_cls.__new__(self.float_cls)
        twin_only = {*self.twin_attributes(), "recompute_operands", "save_codes"}
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

