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

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qat.modules import QuantizedLayer
from qat.quantizer import Quantizer
from qat.summary import observed_range, weight_sqnr_db


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
        for name, layer in self.model.named_modules():
            if isinstance(layer, QuantizedLayer) and layer.input_quantizer is not None:
                self._handles.append(layer.input_quantizer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fractions(self) -> dict[str, float]:
        """Mean saturated fraction of each layer's input over the recorded passes."""
        return {name: (total / self._counts[name]).item() for name, total in self._sums.items()}


@torch.no_grad()
def layer_stats(model: nn.Module, clips: ClipTracker | None = None) -> dict[str, float]:
    """Flat ``{"<layer>/<metric>": value}`` for every quantized layer of a prepared model.

    Metrics: ``weight_scale`` (mean scale), ``weight_sqnr_db``, ``weight_clipped`` (fraction of
    the weight saturated), ``input_min`` / ``input_max`` (observed range), ``input_scale``, and
    ``input_clipped`` when a :class:`ClipTracker` is given. Uncalibrated quantizers are left out.
    """
    stats: dict[str, float] = {}
    input_clipped = clips.fractions() if clips is not None else {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLayer):
            continue
        wq, iq = layer.weight_quantizer, layer.input_quantizer
        if wq is not None and wq.calibrated:
            weight, _ = layer.float_weight_bias()
            stats[f"{name}/weight_scale"] = wq.scale.float().mean().item()
            stats[f"{name}/weight_sqnr_db"] = weight_sqnr_db(layer)
            stats[f"{name}/weight_clipped"] = wq.clipped_fraction(weight).item()
        input_range = observed_range(iq)
        if input_range is not None:
            stats[f"{name}/input_min"], stats[f"{name}/input_max"] = input_range
            stats[f"{name}/input_scale"] = iq.scale.float().mean().item()
        if name in input_clipped:
            stats[f"{name}/input_clipped"] = input_clipped[name]
    return stats
