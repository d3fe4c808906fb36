"""Matplotlib axes that read on a light and on a dark background (notebooks in either theme).

The figure and axes are transparent, and text, ticks, spines and grid are a mid grey that has
contrast on white and on near-black; the default colour cycle's tab10 colours read on both.
"""

from __future__ import annotations

from typing import Any

NEUTRAL = "#8a8a8a"
"""Text and line colour with contrast on white and on a dark notebook theme."""


def themed_axes(ax: Any = None, figsize: tuple[float, float] = (6.0, 3.6)) -> Any:
    """``ax`` (or a new figure's axes) styled for either theme: transparent, grey text and spines.

    Example:
        >>> ax = themed_axes()
        >>> ax.figure.get_facecolor()[3], ax.xaxis.label.get_color()
        (0.0, '#8a8a8a')
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    ax.figure.patch.set_alpha(0.0)
    ax.patch.set_alpha(0.0)
    for spine in ax.spines.values():
        spine.set_color(NEUTRAL)
    ax.tick_params(colors=NEUTRAL, which="both")
    for label in (ax.xaxis.label, ax.yaxis.label, ax.title):
        label.set_color(NEUTRAL)
    ax.grid(True, axis="y", color=NEUTRAL, alpha=0.25, linewidth=0.6)
    ax.set_axisbelow(True)
    return ax


def weight_histogram(layer: Any, channel: int = 0, ax: Any = None, bins: int = 60) -> Any:
    """Histogram of one output channel's float weight (BatchNorm folded, as the quantizer sees
    it) with the quantization grid over it: a line at every value a code dequantizes to. With
    per-group scales, the channel's first group. Returns the matplotlib Axes.

    Example:
        >>> import torch, qat
        >>> model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(64, 4)), {"weight": {"bits": 3}})
        >>> _ = model(torch.randn(2, 64))  # the weight quantizer observes its weight
        >>> ax = weight_histogram(model[0], channel=1)
        >>> len(ax.lines)  # one line per 3-bit code
        8
    """
    import torch

    from qat.core.fake_quant import MIN_SCALE, broadcast_qparam
    from qat.errors import QATError

    quantizer = layer.weight_quantizer
    if quantizer is None or not quantizer.calibrated:
        raise QATError("weight_histogram needs a layer whose weight quantizer has observed its weight (run a forward pass)")
    with torch.no_grad():
        weight = layer.float_weight_bias()[0].detach().float()
        scale = broadcast_qparam(quantizer.scale.detach().float(), weight, quantizer.axis, quantizer.block_size)
        zero = broadcast_qparam(quantizer.zero_point.detach().float(), weight, quantizer.axis, quantizer.block_size)
        scale, zero = scale.expand_as(weight)[channel].flatten(), zero.expand_as(weight)[channel].flatten()
        values = weight[channel].flatten()
        if quantizer.block_size:  # the channel's first group: the elements that share its scale
            values, scale, zero = values[: quantizer.block_size], scale[: quantizer.block_size], zero[: quantizer.block_size]
        s, z = float(scale[0].clamp_min(MIN_SCALE)), float(zero[0].round())
    ax = themed_axes(ax)
    ax.hist(values.numpy(), bins=bins, alpha=0.8, label=f"channel {channel} weights")
    spec = quantizer.spec
    for code in range(spec.qmin, spec.qmax + 1):
        ax.axvline((code - z) * s, color=NEUTRAL, linewidth=0.8, alpha=0.7)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (weights)")
    ax.set_title(f"{spec.describe()}: {spec.qmax - spec.qmin + 1} grid values (lines), step {s:.3g}")
    return ax
