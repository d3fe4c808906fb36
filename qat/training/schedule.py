"""`QATSchedule`: the phases of a QAT run, as a pure function of the training position.

A run moves through phases, each starting at a position counted in optimizer steps or epochs::

    position:  0 ........ calibrate_from ........ fake_quant_from ........ freeze_observers_at ...
    phase:     float warm-up | calibration          | QAT                    | QAT, ranges frozen
               (quantizers    (observers on,          (observers on,           (observers off,
                off)           fake-quant off)         fake-quant on)           fake-quant on)

and, independently:

- ``activation_fake_quant_from``: fake-quantize activations later than weights (weights-only QAT
  first, common for LLMs);
- ``learn_scales_from``: from here, quantizers with a learnable spec (LSQ) stop following their
  observer and learn their scale (and zero point) by gradient; before it, the observer sets them;
- ``freeze_bn_at``: from here, folded BatchNorms use their running statistics.

The phase at a position depends on nothing else, so a resumed run, a second ``fit()``, every
DDP rank and a plain PyTorch loop all reach the same switches from the same position.
:meth:`QATSchedule.apply` sets them; the Lightning callback calls it before every training batch.

Example:
    >>> from qat import QATSchedule
    >>> schedule = QATSchedule(calibrate_from=10, fake_quant_from=50, freeze_observers_at=800)
    >>> [schedule.phase_at(step).name for step in (0, 10, 50, 800)]
    ['float', 'calibration', 'qat', 'qat (observers frozen)']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from qat.errors import ConfigError
from qat.preparation.recipe import _check_keys
from qat.training.control import freeze_bn_stats, quantizers

Unit = Literal["steps", "epochs"]
UNITS = ("steps", "epochs")
MAX_POSITION = 2**31 - 1
"""The latest phase start: a larger step or epoch is never reached (and a typo like ``1e26``)."""


@dataclass(frozen=True)
class Phase:
    """The switches at one position (what :meth:`QATSchedule.apply` sets)."""

    name: str
    index: int
    """0 float, 1 calibration, 2 weights-only QAT, 3 QAT: a number a logger can plot."""
    observe: bool
    fake_quant_weights: bool
    fake_quant_activations: bool
    learn_scales: bool
    bn_frozen: bool

    def describe(self) -> str:
        on = {True: "on", False: "off"}
        return (f"{self.name}: observers {on[self.observe]}, fake-quant weights {on[self.fake_quant_weights]} / "
                f"activations {on[self.fake_quant_activations]}, learnable scales {'learning' if self.learn_scales else 'observed'}, "
                f"BatchNorm statistics {'frozen' if self.bn_frozen else 'updating'}")


def _reached(position: int, start: int | None) -> bool:
    return start is not None and position >= start


@dataclass(frozen=True)
class QATSchedule:
    """When each phase of a QAT run starts, in ``unit`` (optimizer ``steps`` or ``epochs``).

    The default is QAT from the first step: observers and fake-quant on, nothing frozen.

    Args:
        unit: ``steps`` (optimizer steps, ``trainer.global_step``) or ``epochs``.
        calibrate_from: end of the float warm-up; observers turn on.
        fake_quant_from: end of calibration; fake quantization turns on.
        activation_fake_quant_from: delay activation fake-quant past ``fake_quant_from``
            (None: same time as weights).
        learn_scales_from: learnable quantizers stop observing and learn their scales, which
            start from the observed value, so it must come after ``calibrate_from`` (None: at
            ``fake_quant_from``, but never before one step or epoch of observation).
        freeze_observers_at: every observer turns off; scales stay as observed (None: never).
        freeze_bn_at: folded BatchNorms stop updating their statistics (None: never).
    """

    unit: Unit = "steps"
    calibrate_from: int = 0
    fake_quant_from: int = 0
    activation_fake_quant_from: int | None = None
    learn_scales_from: int | None = None
    freeze_observers_at: int | None = None
    freeze_bn_at: int | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError("unit", f"`{self.unit}` is not a unit; allowed: {', '.join(UNITS)}")
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_POSITION:
                allowed = f"an integer ≥ 0 and ≤ {MAX_POSITION}" + (" or null" if f.default is None else "")
                raise ConfigError(f.name, f"`{value!r}` is not {allowed} ({self.unit})")
        self._check_order("fake_quant_from", "calibrate_from", "calibration ends after it starts")
        self._check_order("activation_fake_quant_from", "fake_quant_from", "activations are fake-quantized after weights")
        self._check_order("learn_scales_from", "fake_quant_from", "scales are learned through fake quantization")
        self._check_order("learn_scales_from", "calibrate_from", "a learned scale starts from an observed one", strict=True)
        self._check_order("freeze_observers_at", "calibrate_from", "observers must see data before they freeze", strict=True)

    def _check_order(self, later: str, earlier: str, why: str, strict: bool = False) -> None:
        late, early = getattr(self, later), getattr(self, earlier)
        if late is not None and (late < early or (strict and late == early)):
            relation = "after" if strict else "at or after"
            raise ConfigError(later, f"{late} is out of order: it must come {relation} `{earlier}` ({early}) — {why}")

    @classmethod
    def coerce(cls, value: QATSchedule | Mapping[str, Any] | None) -> QATSchedule:
        """A schedule from itself, a mapping (YAML), or None (the default)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError("schedule", f"expected a mapping of phase starts, got {type(value).__name__}")
        try:
            _check_keys(value, [f.name for f in dataclasses.fields(cls)], "")
            return cls(**value)
        except ConfigError as error:
            raise error.under("schedule") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def learn_from(self) -> int:
        """Where learnable scales start learning: ``learn_scales_from``, or by default
        ``fake_quant_from`` but after at least one position of observation."""
        if self.learn_scales_from is not None:
            return self.learn_scales_from
        return max(self.fake_quant_from, self.calibrate_from + 1)

    def phase_at(self, position: int) -> Phase:
        """The switches at ``position`` (an optimizer step or an epoch, per :attr:`unit`)."""
        calibrating = _reached(position, self.calibrate_from)
        weights = _reached(position, self.fake_quant_from)
        activation_start = self.fake_quant_from if self.activation_fake_quant_from is None else self.activation_fake_quant_from
        activations = _reached(position, activation_start)
        frozen = _reached(position, self.freeze_observers_at)
        if not calibrating:
            name, index = "float", 0
        elif not weights:
            name, index = "calibration", 1
        else:
            name, index = ("qat", 3) if activations else ("qat (weights only)", 2)
            if frozen:
                name += " (observers frozen)"
        return Phase(
            name=name, index=index,
            observe=calibrating and not frozen,
            fake_quant_weights=weights,
            fake_quant_activations=activations,
            learn_scales=_reached(position, self.learn_from),
            bn_frozen=_reached(position, self.freeze_bn_at),
        )

    def apply(self, model: nn.Module, position: int) -> Phase:
        """Set every quantizer and folded BatchNorm of ``model`` to the phase at ``position``.

        Cheap (Python flags only, no tensor work), so call it before every training step.
        """
        phase = self.phase_at(position)
        for _, q in quantizers(model):
            q.enable_observer(phase.observe and not (q.spec.learnable and phase.learn_scales))
            q.enable_fake_quant(phase.fake_quant_weights if q.role == "weight" else phase.fake_quant_activations)
        freeze_bn_stats(model, phase.bn_frozen)
        return phase
