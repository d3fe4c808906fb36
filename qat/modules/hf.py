"""Quantized twin of Hugging Face's ``Conv1D`` (GPT-2's projections: ``y = x @ W + b``, ``W`` is
``(in, out)``). Imported only when ``transformers`` is already loaded (see
:func:`qat.modules.twin_for`), so lightning-qat itself does not need transformers."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from qat.modules.base import QuantizedLayer


class QuantHFConv1D(QuantizedLayer, Conv1D):
    """``transformers.pytorch_utils.Conv1D`` twin: per-channel scales along axis 1 (outputs),
    per-group blocks along axis 0 (inputs)."""

    float_cls = Conv1D
    channel_axis = 1
    input_axis = 0

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x_q, weight = self.quantize_input(x), self.quantize_weight(self.weight)
        with self.recomputing(x, x_q, weight):
            y = torch.addmm(self.bias, x_q.reshape(-1, x_q.size(-1)), weight)
        return y.view(size_out)
