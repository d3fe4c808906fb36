"""Quantized twin of a LoRA-adapted ``nn.Linear`` (Hugging Face ``peft``): QAT on the merged weight.

A LoRA layer computes ``x @ W.T + s · (x @ A.T) @ B.T`` with ``W`` frozen and the adapters ``A``
(rank × in), ``B`` (out × rank) trained. What a device runs after merging is one linear layer
with the weight ``W + s · B @ A``, quantized once. This twin trains exactly that: its forward
fake-quantizes the merged weight and runs one linear layer, so the gradient reaches ``A`` and
``B`` through the quantized weight the deployed model holds, and the merged, quantized model is
what was trained, bit for bit. :func:`qat.strip` and the export merge the adapters into a plain
``nn.Linear`` and quantize once.

Imported only when ``peft`` is already loaded (see :func:`qat.modules.twin_for`), so
lightning-qat itself does not need peft. Refused, with the layer named, where the merged form is
not what the layer computes: adapter dropout (it drops the adapter's input only), DoRA, adapter
biases, ``fan_in_fan_out`` layouts, and a layer whose adapters are already merged.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn

from qat.errors import QATError
from qat.modules.base import QuantizedLayer


def _check_mergeable(layer: LoraLinear) -> None:
    """Refuse what the merged weight does not compute."""
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        dropout = layer.lora_dropout[name]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise QATError(f"adapter `{name}` has lora_dropout={dropout.p}: QAT trains the merged weight W + s·B·A, which has "
                           "no separate adapter input to drop; set lora_dropout=0 in the LoraConfig")
        if layer.use_dora.get(name, False):
            raise QATError(f"adapter `{name}` uses DoRA, whose magnitude rescales each output channel: not supported")
        if getattr(layer, "lora_bias", {}).get(name, False):  # peft ≥ 0.14
            raise QATError(f"adapter `{name}` has a bias (lora_bias=True): not supported")
    if layer.fan_in_fan_out:
        raise QATError("fan_in_fan_out=True (a transposed base weight): not supported")
    if layer.merged:
        raise QATError("its adapters are merged already: prepare the model before merging, or unmerge first")


class QuantLoRALinear(QuantizedLayer, LoraLinear):
    """``peft.tuners.lora.Linear`` whose forward is one linear layer with the fake-quantized
    merged weight (module docstring). Its state dict keys are peft's own, plus the quantizers'.

    ``set_recompute`` leaves this layer's operands saved: recomputing the weight in the backward
    pass would need the adapters' product again."""

    float_cls = LoraLinear

    @classmethod
    def from_float(cls, layer, weight, activation, int32_bias=False):
        _check_mergeable(layer)
        return super().from_float(layer, weight, activation, int32_bias)

    def merged_weight(self) -> Tensor:
        """``W + Σ s · B @ A`` over the active adapters, in the base weight's dtype."""
        weight = self.base_layer.weight
        for name in self.active_adapters:
            if name in self.lora_A:
                delta = self.lora_B[name].weight @ self.lora_A[name].weight
                weight = weight + (delta * self.scaling[name]).to(weight.dtype)
        return weight

    def float_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        return self.merged_weight(), self.base_layer.bias

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        x_q, weight = self.quantize_input(x), self.quantize_weight(self.merged_weight())
        context = nullcontext() if self.recompute_operands else self.recomputing(x, x_q, weight)
        with context:
            return F.linear(x_q, weight, self.quantize_bias(self.base_layer.bias))

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the fake-quantized merged weight: the adapters merged, quantized once."""
        weight, bias = self.inference_weight_bias()
        base = self.base_layer
        layer = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.requires_grad_(base.weight.requires_grad)
        return layer.train(self.training)
