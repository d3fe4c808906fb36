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

import torch
from torch import nn

from qat.analysis.summary import observed_range, weight_sqnr_db
from qat.preparation.prepare import STATE_NAME
from qat.training.clipping import ClipTracker, activation_quantizers
from qat.training.sharding import quantized_layers


@torch.no_grad()
def layer_stats(model: nn.Module, clips: ClipTracker | None = None) -> dict[str, float]:
    """Flat ``{"<layer>/<metric>": value}`` for every quantized layer of a prepared model.

    Metrics: ``weight_scale`` (mean scale), ``weight_sqnr_db``, ``weight_clipped`` (fraction of
    the weight saturated), ``input_min`` / ``input_max`` (observed range), ``input_scale``, and
    ``input_clipped`` when a :class:`ClipTracker` is given, ``input_clipped_at_calibration`` after
    :func:`qat.calibrate` (on its last batch: more than half means the range collapsed); the same
    ``output_*`` metrics for a module whose output is quantized (recipe ``residuals`` or ``operators``).
    Uncalibrated quantizers are left out.
    """
    stats: dict[str, float] = {}
    clipped = clips.fractions() if clips is not None else {}
    state = getattr(model, STATE_NAME, None)
    at_calibration = getattr(state, "calibration_clipped", {})
    for name, layer in quantized_layers(model):
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
        if key in at_calibration:
            stats[f"{key}_clipped_at_calibration"] = at_calibration[key]
    return stats
