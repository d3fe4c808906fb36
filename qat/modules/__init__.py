"""Quantized twins of float layers, and the registry that maps a float layer type to its twin."""

from __future__ import annotations

import sys

from torch import nn

from qat.modules.base import QuantizedLayer
from qat.modules.conv import QuantConv1d, QuantConv2d, QuantConv3d, QuantConvNd, QuantConvTranspose2d
from qat.modules.linear import QuantEmbedding, QuantLinear

TWINS: dict[type[nn.Module], type[QuantizedLayer]] = {
    twin.float_cls: twin
    for twin in (QuantLinear, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose2d, QuantEmbedding)
}
"""Float layer type → quantized twin. Only exact types are swapped: a subclass may compute
something else in its forward, so it is reported as left float instead."""


def twin_for(layer: nn.Module) -> type[QuantizedLayer] | None:
    """The twin class for ``layer``'s exact type, or None.

    Hugging Face's ``Conv1D`` twin and peft's LoRA ``Linear`` twin are registered on first use when
    ``transformers`` / ``peft`` is already imported (a model that contains such a layer has imported
    it), so lightning-qat never imports either itself.
    """
    if "transformers.pytorch_utils" in sys.modules:
        from qat.modules.hf import QuantHFConv1D

        TWINS.setdefault(QuantHFConv1D.float_cls, QuantHFConv1D)
    if "peft.tuners.lora" in sys.modules:
        from qat.modules.lora import QuantLoRALinear

        TWINS.setdefault(QuantLoRALinear.float_cls, QuantLoRALinear)
    return TWINS.get(type(layer))


__all__ = [
    "TWINS",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvNd",
    "QuantConvTranspose2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedLayer",
    "twin_for",
]
