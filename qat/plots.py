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
