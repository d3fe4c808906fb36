"""The one door between the numeric core and the speed wing (:mod:`qat.speed`).

The core computes every value and gradient with plain tensor ops and one autograd function
(:class:`~qat.core.fake_quant.FakeQuantizeFunction`). Faster equivalents (Triton kernels, saved
masks and integer codes, folded BatchNorm nodes, kept weights, recomputed operands) live in
:mod:`qat.speed`, which registers a :class:`SpeedWing` here when ``qat`` is imported. The core
asks it first and falls back to the plain path where it declines (returns None). The core never
imports the speed wing, so the math reads without it, and every fast path is checked bit for bit
against the plain one (``tests/test_speed_paths.py``).

Example:
    >>> import torch
    >>> import qat
    >>> from qat.core import faster
    >>> faster.wing() is not None  # registered by ``import qat``
    True
    >>> with faster.plain():  # the plain autograd function only, e.g. to compare or debug
    ...     faster.wing() is None
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from qat.core.quantizer import Quantizer


class SpeedWing(Protocol):
    """What the speed wing offers the core and the quantized layers; each method returns None
    (or a no-op context) where it has nothing faster, and the caller takes the plain path."""

    def quantizer_forward(self, quantizer: Quantizer, x: Tensor, factor: Tensor | None, request: object) -> Tensor | None:
        """:meth:`Quantizer.forward <qat.core.quantizer.Quantizer.forward>`, faster; ``request``:
        what :meth:`quantize_operand` asked of this call (None from other callers)."""

    def quantize_operand(self, layer, quantizer: Quantizer, t: Tensor, factor: Tensor | None, keepable: bool) -> Tensor:
        """A quantized layer's input or weight through ``quantizer`` (called as a module, with a
        request for its forward), kept for the layer's backward pass in its cheapest form
        (integer codes, or recomputed; ``keepable``: ``t`` itself stays alive until the backward
        pass, so it may be saved instead of a mask)."""

    def recomputing(self, layer, x: Tensor, x_q: Tensor, w_q: Tensor, weight_factor: Tensor | None) -> AbstractContextManager:
        """Context for a quantized layer's own op, saving its operands as :meth:`quantize_operand` chose."""

    def finite_range(self, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        """Each row's finite min and max, as :func:`qat.core.observers.finite_range`."""


_registered: SpeedWing | None = None
_plain = False


def register(speed_wing: SpeedWing) -> None:
    """Make ``speed_wing`` the one the core asks (:mod:`qat.speed` calls this on import)."""
    global _registered
    _registered = speed_wing


def wing() -> SpeedWing | None:
    """The registered speed wing, or None (none registered, or inside :func:`plain`)."""
    return None if _plain else _registered


@contextmanager
def plain() -> Iterator[None]:
    """Inside this block the core and the layers use the plain path only."""
    global _plain
    previous, _plain = _plain, True
    try:
        yield
    finally:
        _plain = previous
