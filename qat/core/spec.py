"""`QuantSpec`: the numeric format of one quantizer.

A spec says how a tensor is mapped to integers: bit width, signedness, symmetric or affine,
narrow range, granularity (what shares a scale) and how the range is observed. It is a frozen
dataclass validated on construction, so a bad recipe fails where it is written, not mid-training.

Granularity, with the shape of the scale for an input of shape ``x``:

- ``per_tensor``: one scale, shape ``()``.
- ``per_channel``: one scale per index along ``axis``, shape ``(x.shape[axis],)``
  (ONNX ``axis``). For a Linear weight ``(out, in)`` the default axis is 0.
- ``per_group``: blocks of ``group_size`` consecutive elements along ``axis`` share a scale;
  the scale has ``x``'s shape with ``x.shape[axis]`` replaced by ``ceil(x.shape[axis] /
  group_size)`` (ONNX ``block_size``). ``(out=8, in=64)`` with group 32 along axis 1 → ``(8, 2)``.
- ``per_token``: dynamic, for activations: one scale per row of the last dimension, computed
  from the tensor itself at every call; ``(B, T, H)`` → ``(B, T, 1)``. With ``group_size``, one
  scale per block of ``group_size`` along the last dimension: ``(B, T, H)`` → ``(B, T,
  ceil(H / group_size))``. That is how ONNX Runtime's MatMulNBits quantizes its input when it
  computes in int8 (symmetric int8 blocks of the weight's group size).

Example:
    >>> from qat import QuantSpec
    >>> w4 = QuantSpec(bits=4, granularity="per_group", group_size=32)
    >>> (w4.qmin, w4.qmax)
    (-8, 7)
    >>> w4.qparam_shape((16, 64), axis=1)
    (16, 2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from qat.errors import ConfigError

Role = Literal["weight", "activation"]
ROLES: tuple[Role, ...] = ("weight", "activation")


class Granularity(str, Enum):
    """Which elements share one scale and zero point."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"
    PER_TOKEN = "per_token"


class ObserverKind(str, Enum):
    """How a quantizer turns the values it sees into a range (see :mod:`qat.core.observers`)."""

    MINMAX = "minmax"
    MOVING_AVERAGE_MINMAX = "moving_average_minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


BITS = (2, 3, 4, 5, 6, 7, 8, 16)
WEIGHT_MAX_BITS = 8


def _choices(enum: type[Enum]) -> str:
    return ", ".join(f"`{m.value}`" for m in enum)


def _coerce_enum(enum: type[Enum], key: str, value: object) -> Enum:
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(key, f"got `{value!r}`; allowed: {_choices(enum)}") from None


def _require_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false; got `{value!r}`")


def _is_int(value: object) -> bool:
    """A real integer: not a bool, and not a float even when whole (YAML reads ``1e26`` as a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


MAX_GROUP_SIZE = 2**20
"""The largest ``group_size``: larger blocks are per-channel scales in all but name, and a huge
value would only fail later, inside the kernels."""
MAX_RANK = 8
"""``axis`` lies in [-MAX_RANK, MAX_RANK): no layer has a tensor of higher rank."""


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(low, high)``: the codes a ``bits``-wide integer type holds, two's complement when ``signed``.

    The one derivation of integer bounds: quantization ranges, ONNX containers and code storage use it.

    Example:
        >>> integer_range(4, signed=True), integer_range(8, signed=False), integer_range(16, signed=True)
        ((-8, 7), (0, 255), (-32768, 32767))
    """
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@dataclass(frozen=True)
class QuantSpec:
    """Numeric format of one quantizer (see the module docstring for granularity shapes).

    Args:
        bits: 2–8; 16 is allowed for activations.
        signed: signed integers (int4: [-8, 7]) or unsigned (uint4: [0, 15]).
        symmetric: zero point fixed (0 when signed, the mid-point when unsigned); otherwise
            affine, with the zero point chosen from the observed minimum.
        narrow_range: drop the lowest code (int8 [-127, 127]), keeping the grid symmetric.
        granularity: ``per_tensor`` | ``per_channel`` | ``per_group`` | ``per_token``.
        axis: channel axis (``per_channel``) or the axis blocks run along (``per_group``);
            ``None`` lets the layer choose (output channels / input features); -8 to 7.
        group_size: elements per block for ``per_group`` (required) or ``per_token`` (optional:
            blocks of the last dimension instead of whole rows), 1 to 2^20.
        observer: ``minmax`` | ``moving_average_minmax`` | ``percentile`` (activations) |
            ``mse`` (weights).
        averaging_constant: weight of the newest batch in ``moving_average_minmax`` and
            ``percentile`` (torch.ao's default is 0.01).
        percentile: the upper percentile kept by the ``percentile`` observer; the lower one is
            ``100 - percentile``.
        learnable: train scale (and zero point when affine) with LSQ / LSQ+ gradients.
        extreme_on_grid: symmetric only: each scale's largest-magnitude value lands exactly on
            the grid's outer level, using all ``2**bits`` levels (ONNX Runtime's int4 rule):
            ``s = amax / 2**(bits-1)``, and where that value is positive the zero point is one
            below the symmetric one (int4: codes minus the zero point span [-7, 8] instead of
            [-8, 7]). A plain symmetric grid (``amax / 7.5`` for int4) puts no level on either
            extreme. The zero point then varies per scale, so the sidecar records the format as
            not symmetric (:attr:`fixed_zero_point`).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int | None = None
    group_size: int | None = None
    observer: ObserverKind = ObserverKind.MINMAX
    averaging_constant: float = 0.01
    percentile: float = 99.99
    learnable: bool = False
    extreme_on_grid: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise str → enum in place
        set_(self, "granularity", _coerce_enum(Granularity, "granularity", self.granularity))
        set_(self, "observer", _coerce_enum(ObserverKind, "observer", self.observer))
        if not _is_int(self.bits) or self.bits not in BITS:
            allowed = ", ".join(map(str, BITS))
            raise ConfigError("bits", f"must be one of {allowed} (16 for activations only); got `{self.bits!r}`")
        for name in ("signed", "symmetric", "narrow_range", "learnable", "extreme_on_grid"):
            _require_bool(name, getattr(self, name))
        if self.extreme_on_grid and (not self.symmetric or self.narrow_range):
            raise ConfigError("extreme_on_grid", "needs `symmetric: true` and `narrow_range: false` (it shifts the symmetric grid "
                              "by one level towards each scale's largest-magnitude value)")
        grouped = self.granularity is Granularity.PER_GROUP
        if self.axis is not None:
            if not _is_int(self.axis) or not -MAX_RANK <= self.axis < MAX_RANK:
                raise ConfigError("axis", f"must be an integer from {-MAX_RANK} to {MAX_RANK - 1} or null; got `{self.axis!r}`")
            if self.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
                raise ConfigError("axis", f"is only used with granularity `per_channel` or `per_group`, not `{self.granularity.value}`")
        if grouped and self.group_size is None:
            raise ConfigError("group_size", "is required with granularity `per_group` (e.g. 32, 64 or 128)")
        if self.group_size is not None:
            if self.granularity not in (Granularity.PER_GROUP, Granularity.PER_TOKEN):
                raise ConfigError("group_size", f"is only used with granularity `per_group` or `per_token`, not `{self.granularity.value}`")
            if not _is_int(self.group_size) or not 1 <= self.group_size <= MAX_GROUP_SIZE:
                raise ConfigError("group_size", f"must be an integer from 1 to {MAX_GROUP_SIZE} (2^20); got `{self.group_size!r}`")
        if self.granularity is Granularity.PER_TOKEN and self.learnable:
            raise ConfigError("learnable", "per_token scales are computed from each input; they cannot be learned")
        if not _is_number(self.averaging_constant) or not 0 < self.averaging_constant <= 1:
            raise ConfigError("averaging_constant", f"must be a number in (0, 1]; got `{self.averaging_constant!r}`")
        if not _is_number(self.percentile) or not 50 < self.percentile <= 100:
            raise ConfigError("percentile", f"must be a number in (50, 100]; got `{self.percentile!r}`")

    # -- derived numbers -------------------------------------------------------------------------

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return integer_range(self.bits, self.signed)[0] + int(self.narrow_range)

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return integer_range(self.bits, self.signed)[1]

    @property
    def fixed_zero_point(self) -> bool:
        """True when every zero point is :attr:`symmetric_zero_point` (symmetric, not
        :attr:`extreme_on_grid`)."""
        return self.symmetric and not self.extreme_on_grid

    @property
    def symmetric_zero_point(self) -> int:
        """The fixed zero point of a symmetric spec: 0, or the mid-point code when unsigned."""
        return 0 if self.signed else 2 ** (self.bits - 1)

    @property
    def dtype_name(self) -> str:
        """Integer type the codes fit in, by name: ``int4``, ``uint8``, ``int16``…"""
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def dynamic(self) -> bool:
        """True when scales come from each input (``per_token``), not from an observer."""
        return self.granularity is Granularity.PER_TOKEN

    @property
    def per_tensor_static(self) -> bool:
        """True for one scale per tensor, fixed ahead of time: what integer kernels that add or
        compare two tensors need."""
        return self.granularity is Granularity.PER_TENSOR

    def resolve_axis(self, ndim: int, default: int) -> int:
        """The axis this spec uses on a tensor of rank ``ndim``, normalised to be non-negative."""
        axis = default if self.axis is None else self.axis
        if not -ndim <= axis < ndim:
            raise ConfigError("axis", f"`{axis}` is out of range for a tensor of rank {ndim}")
        return axis % ndim

    def qparam_shape(self, shape: Sequence[int], axis: int) -> tuple[int, ...]:
        """Shape of the scale for a tensor of ``shape`` (ONNX layout; ``axis`` already resolved)."""
        if self.granularity is Granularity.PER_TENSOR:
            return ()
        if self.granularity is Granularity.PER_CHANNEL:
            return (shape[axis],)
        if self.granularity is Granularity.PER_GROUP:
            blocked = list(shape)
            blocked[axis] = math.ceil(shape[axis] / self.group_size)
            return tuple(blocked)
        return (*shape[:-1], 1 if self.group_size is None else math.ceil(shape[-1] / self.group_size))

    def check_role(self, role: Role) -> None:
        """Raise :class:`ConfigError` when this spec cannot quantize a ``role`` tensor."""
        if role not in ROLES:
            raise ConfigError("role", f"got `{role!r}`; allowed: `weight`, `activation`")
        if role == "weight":
            if self.bits > WEIGHT_MAX_BITS:
                raise ConfigError("bits", f"weights take 2–8 bits; got `{self.bits}` (16 is for activations)")
            if self.granularity is Granularity.PER_TOKEN:
                raise ConfigError("granularity", "`per_token` is for activations; weights take `per_tensor`, `per_channel` or `per_group`")
            if self.observer is ObserverKind.PERCENTILE:
                raise ConfigError("observer", "`percentile` is for activations; weights take `minmax`, `moving_average_minmax` or `mse`")
        else:
            if self.granularity in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
                raise ConfigError(
                    "granularity",
                    f"activations take `per_tensor` (static) or `per_token` (dynamic); got `{self.granularity.value}`",
                )
            if self.observer is ObserverKind.MSE:
                raise ConfigError(
                    "observer", "`mse` searches weight clipping; activations take `minmax`, `moving_average_minmax` or `percentile`"
                )

    def replace(self, **changes: object) -> QuantSpec:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        """Plain values (enums as strings), the form recipes and metadata use."""
        out = dataclasses.asdict(self)
        out["granularity"] = self.granularity.value
        out["observer"] = self.observer.value
        return out

    def describe(self) -> str:
        """Short human label, e.g. ``int4 per_group(32) sym mse``."""
        gran = self.granularity.value
        if self.group_size is not None:
            gran += f"({self.group_size})"
        parts = [self.dtype_name, gran, "sym" if self.symmetric else "affine"]
        if self.narrow_range:
            parts.append("narrow")
        if not self.dynamic:
            parts.append(self.observer.value)
        if self.learnable:
            parts.append("lsq")
        return " ".join(parts)
