"""Which share of each quantized activation saturates: :class:`ClipTracker`.

Used by :func:`qat.layer_stats` (what the Lightning callback logs) and by :func:`qat.calibrate`,
which measures its last batch to find collapsed ranges.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qat.core.quantizer import Quantizer
from qat.modules import QuantizedLayer
from qat.preparation.residuals import OUTPUT_QUANTIZER


class ClipTracker:
    """Within a ``with`` block, record the fraction of each quantized layer's input that saturates.

    Forward hooks on the input quantizers, removed on exit; the mean over the passes run inside
    the block is returned by :meth:`fractions` (one host read per layer).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, name: str):
        def record(quantizer: Quantizer, args: tuple[Any, ...], output: Tensor) -> None:
            fraction = quantizer.clipped_fraction(args[0])
            self._sums[name] = self._sums[name] + fraction if name in self._sums else fraction
            self._counts[name] = self._counts.get(name, 0) + 1
        return record

    def __enter__(self) -> ClipTracker:
        for name, quantizer in activation_quantizers(self.model):
            self._handles.append(quantizer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fractions(self) -> dict[str, float]:
        """Mean saturated fraction of each quantized activation over the recorded passes, by
        ``<layer>/input`` (and ``<module>/output`` for a quantized residual connection or operator)."""
        return {name: (total / self._counts[name]).item() for name, total in self._sums.items()}



def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every activation quantizer, keyed ``<layer>/input`` (a layer's input) or ``<module>/output``
    (an output quantized by the recipe's ``residuals`` or ``operators``)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer) and module.input_quantizer is not None:
            yield f"{name}/input", module.input_quantizer
        output = getattr(module, OUTPUT_QUANTIZER, None)
        if isinstance(output, Quantizer):
            yield f"{name}/output", output
