"""Per-layer training statistics: what the Lightning callback logs, usable from any loop.

:func:`layer_stats` reads the state of every quantized layer (observed input range, scales, weight
SQNR and the fraction of the weight that saturates); :class:`ClipTracker` adds the fraction of
each layer's *input* that saturates, measured on the forward passes run inside it. Both read the
host, so call them every N steps, not every step.

Example:
    >>> import torch, qat
    >>> model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    >>> with qat.ClipTracker(model) as clips:
    ...     _ = model(torch.randn(8, 4))
    >>> stats = qat.layer_stats(model, clips)
    >>> sorted(k for k in stats if k.startswith("0/"))
    ['0/input_clipped', '0/input_max', '0/input_min', '0/input_scale', '0/weight_clipped', '0/weight_scale', '0/weight_sqnr_db']
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qat.analysis.summary import observed_range, weight_sqnr_db
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
        ``<layer>/input`` (and ``<module>/output`` for a quantized residual connection)."""
        return {name: (total / self._counts[name]).item() for name, total in self._sums.items()}


@torch.no_grad()
def layer_stats(model: nn.Module, clips: ClipTracker | None = None) -> dict[str, float]:
    """Flat ``{"<layer>/<metric>": value}`` for every quantized layer of a prepared model.

    Metrics: ``weight_scale`` (mean scale), ``weight_sqnr_db``, ``weight_clipped`` (fraction of
    the weight saturated), ``input_min`` / ``input_max`` (observed range), ``input_scale``, and
    ``input_clipped`` when a :class:`ClipTracker` is given; the same ``output_*`` metrics for a
    module whose output is quantized (recipe ``residuals``). Uncalibrated quantizers are left out.
    """
    stats: dict[str, float] = {}
    clipped = clips.fractions() if clips is not None else {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLayer):
            continue
        wq = layer.weight_quantizer
        if wq is not None and wq.calibrated:
            weight, _ = layer.float_weight_bias()
            stats[f"{name}/weight_scale"] = wq.scale.float().mean().item()
            stats[f"{name}/weight_sqnr_db"] = weight_sqnr_db(layer)
            stats[f"{name}/weight_clipped"] = wq.clipped_fraction(weight).item()
    for key, q in activation_quantizers(model):
        observed = observed_range(q)
        if observed is not None:
            stats[f"{key}_min"], stats[f"{key}_max"] = observed
            stats[f"{key}_scale"] = q.scale.float().mean().item()
        if key in clipped:
            stats[f"{key}_clipped"] = clipped[key]
    return stats


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every activation quantizer, keyed ``<layer>/input`` (a layer's input) or ``<module>/output``
    (an output quantized by the recipe's ``residuals``)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer) and module.input_quantizer is not None:
            yield f"{name}/input", module.input_quantizer
        output = getattr(module, OUTPUT_QUANTIZER, None)
        if isinstance(output, Quantizer):
            yield f"{name}/output", output
