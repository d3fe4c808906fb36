"""Quantized twins of ``nn.Linear`` and ``nn.Embedding``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qat.core.fake_quant import export_face
from qat.core.spec import Granularity
from qat.modules.base import QuantizedLayer


class QuantLinear(QuantizedLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weight ``(out, in)`` and, optionally, input and bias."""

    float_cls = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        x, weight = self.quantize_input(input), self.quantize_weight(self.weight)
        with self.recomputing(input, x, weight):
            return F.linear(x, weight, self.quantize_bias(self.bias))


class QuantEmbedding(QuantizedLayer, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table ``(num, dim)``: per-channel scales per row,
    per-group blocks along the embedding dimension. Its input is indices: never quantized.

    In training, where each row has scales of its own (per tensor, per row, or blocks along the
    row), only the rows a batch reads are fake-quantized, with their own scales: the same values
    as quantizing the whole table and looking up, for a batch's few thousand rows instead of a
    vocabulary's tens of thousands (an LLM's table is its largest weight). The weight observer
    still sees the whole table. An export quantizes the whole table, as it is stored."""

    float_cls = nn.Embedding
    takes_activation = False
    saves_operands = False

    def float_weight_bias(self) -> tuple[Tensor, None]:
        return self.weight, None

    def forward(self, input: Tensor) -> Tensor:
        if self._rows_alone():
            return self.weight_quantizer.rows(self.weight, self._lookup(input))
        weight = self.quantize_weight(self.weight)
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def _lookup(self, input: Tensor):
        """The lookup of ``input``'s rows in a table of ``num`` rows (the weight, or its scales
        laid out one row each), with this layer's gradient options."""
        return lambda table: F.embedding(input, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq)

    def _rows_alone(self) -> bool:
        """Whether the rows a batch reads can be fake-quantized alone: each row's scales are its
        own, the table is not renormalised in place (``max_norm``) nor given a sparse gradient,
        and no exporter is tracing the stored table."""
        q = self.weight_quantizer
        if q is None or self.max_norm is not None or self.sparse or export_face():
            return False
        granularity = q.spec.granularity
        return (granularity is Granularity.PER_TENSOR or (granularity is Granularity.PER_CHANNEL and q.axis == 0)
                or (granularity is Granularity.PER_GROUP and q.axis == 1))
