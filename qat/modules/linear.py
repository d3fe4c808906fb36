"""Quantized twins of ``nn.Linear`` and ``nn.Embedding``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qat.modules.base import QuantizedLayer


class QuantLinear(QuantizedLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weight ``(out, in)`` and, optionally, input."""

    float_cls = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        x, weight = self.quantize_input(input), self.quantize_weight(self.weight)
        with self.recomputing(input, x, weight):
            return F.linear(x, weight, self.bias)


class QuantEmbedding(QuantizedLayer, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table ``(num, dim)``: per-channel scales per row,
    per-group blocks along the embedding dimension. Its input is indices: never quantized."""

    float_cls = nn.Embedding
    takes_activation = False
    saves_operands = False

    def float_weight_bias(self) -> tuple[Tensor, None]:
        return self.weight, None

    def forward(self, input: Tensor) -> Tensor:
        weight = self.quantize_weight(self.weight)
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
