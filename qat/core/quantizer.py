"""`Quantizer`: spec + observer + scale/zero-point state + switches, as one module.

A quantizer sits wherever a tensor is fake-quantized (a layer's weight, a layer's input). Its
forward observes the tensor when observation is on (updating ``scale`` / ``zero_point``), then
fake-quantizes it with the current parameters when fake quantization is on. The two switches
give the phases of a QAT run: calibration (observe, no fake-quant), QAT (both), frozen ranges
(fake-quant only), and float (neither). They do not follow ``train()`` / ``eval()``: calibration
usually runs in eval mode, so turning observation off for validation or export is the caller's
decision (the Lightning callback makes it).

State: ``scale`` and ``zero_point`` are buffers, or parameters when the spec is learnable (LSQ;
the zero point is learned too when the spec is affine, LSQ+); the observer's range is in its
buffers; the two switches are plain Python booleans saved through ``get_extra_state`` — a
tensor flag would need a host read (a GPU sync) at every step. ``state_dict`` therefore carries
all of it, and ``load_state_dict`` restores it exactly.

Example:
    >>> import torch
    >>> from qat import QuantSpec
    >>> from qat.core.quantizer import Quantizer
    >>> q = Quantizer(QuantSpec(bits=4, granularity="per_channel"), shape=(8, 16), role="weight", default_axis=0)
    >>> w = torch.randn(8, 16)
    >>> bool(((q(w) - w).abs() <= q.scale[:, None] / 2 + 1e-6).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qat.errors import QATError
from qat.core.fake_quant import (
    MIN_SCALE,
    QuantizedCodes,
    broadcast_qparam,
    export_face,
    fake_quantize,
    fake_quantize_folded,
    fake_quantize_kept,
    fake_quantize_math,
    fake_quantize_values,
    reuse_fake_quantized,
)
from qat.core.observers import MinMaxObserver, MSEObserver, finite_range_checked, make_observer, reduce_groups
from qat.core.qparams import qparams_from_range
from qat.core.snapshot import snapshot
from qat.core.spec import Granularity, QuantSpec, Role


class Quantizer(nn.Module):
    """Observe and fake-quantize one tensor according to ``spec``.

    Args:
        spec: the numeric format.
        shape: shape of the tensor this quantizer sees; required for ``per_channel`` and
            ``per_group`` (a weight's shape is known when the layer is prepared).
        role: ``weight`` (the range follows the current weight) or ``activation`` (ranges
            accumulate over batches and are all-reduced across ranks).
        default_axis: the axis used when ``spec.axis`` is None (the layer's channel axis for
            ``per_channel``, its input axis for ``per_group``).
    """

    export_name: str = ""
    """The quantizer's module path in the model being exported, set by the exporter while it traces
    and carried by the export face's op, so each QuantizeLinear in the graph names its quantizer."""
    reuse_unchanged: bool = False
    """Keep a weight's fake-quantized value and mask, and use them again while the weight and the
    scale are unchanged (:func:`qat.set_weight_reuse`)."""
    _kept: tuple | None = None
    tokens_finite: bool = False
    """Per-token quantizers: whether the last tensor whose scales were computed was seen all
    finite (False: not known), as :attr:`qat.core.observers.Observer.all_finite`."""

    def __init__(self, spec: QuantSpec, shape: Sequence[int] | None = None, role: Role = "activation", default_axis: int = 0) -> None:
        super().__init__()
        spec.check_role(role)
        needs_shape = spec.granularity in (Granularity.PER_CHANNEL, Granularity.PER_GROUP)
        if needs_shape and shape is None:
            raise QATError(f"a {spec.granularity.value} quantizer needs the shape of the tensor it quantizes")
        shape = tuple(shape or ())
        self.spec, self.role = spec, role
        self.axis = spec.resolve_axis(len(shape), default_axis) if needs_shape else 0
        self.block_size = spec.group_size if spec.granularity is Granularity.PER_GROUP else 0
        self.observer_enabled = not spec.dynamic
        self.fake_quant_enabled = True
        self.observer = None
        if not spec.dynamic:
            is_activation = role == "activation"
            self.observer = make_observer(spec, shape, self.axis, accumulate=is_activation, sync=is_activation)
        qshape = spec.qparam_shape(shape, self.axis) if not spec.dynamic else ()
        scale = torch.ones(qshape)
        zero_point = torch.full(qshape, float(spec.symmetric_zero_point if spec.symmetric else spec.qmin))
        if spec.learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if spec.learnable and not spec.symmetric:
            self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("zero_point", zero_point)
        self.zero_point_is_zero = spec.symmetric and spec.symmetric_zero_point == 0

    # -- switches ------------------------------------------------------------------------------

    def enable_observer(self, enabled: bool = True) -> Quantizer:
        """Turn range observation on or off (dynamic per-token quantizers have nothing to observe)."""
        self.observer_enabled = bool(enabled) and not self.spec.dynamic
        return self

    def enable_fake_quant(self, enabled: bool = True) -> Quantizer:
        """Turn fake quantization on or off (off: the tensor passes through unchanged)."""
        self.fake_quant_enabled = bool(enabled)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"observer_enabled": self.observer_enabled, "fake_quant_enabled": self.fake_quant_enabled}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.enable_observer(state.get("observer_enabled", True))
        self.enable_fake_quant(state.get("fake_quant_enabled", True))

    # -- numbers ---------------------------------------------------------------------------------

    @property
    def calibrated(self) -> bool:
        """True once a finite range was observed for every group (dynamic: always). Reads the host."""
        if self.observer is None:
            return True
        return bool(torch.isfinite(self.observer.min_val).all() and torch.isfinite(self.observer.max_val).all())

    def grad_factor(self, x: Tensor) -> float:
        """LSQ's gradient scale ``1 / sqrt(N * qmax)``, N = elements per scale."""
        per_scale = max(1, x.numel() // max(1, self.scale.numel()))
        return 1.0 / math.sqrt(per_scale * max(1, self.spec.qmax))

    def dynamic_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token scale and zero point of ``x`` (shape ``(..., 1)``), from its own range.

        Snapshotted so a compiled backward reuses them: recomputed there with other arithmetic,
        a row's maximum — which sits exactly on the tie ``(qmax - qmin) / 2`` — can round the
        other way and flip its straight-through mask."""
        low, high = reduce_groups(x.detach(), self.spec, x.ndim - 1, self._checked_token_range)
        scale, zero_point = qparams_from_range(low, high, self.spec)
        return snapshot(scale), snapshot(zero_point)

    def _checked_token_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`~qat.core.observers.finite_range` of the tokens, keeping in :attr:`tokens_finite`
        whether they were seen all finite (on the CPU), as an observer's ``all_finite``."""
        low, high, self.tokens_finite = finite_range_checked(rows)
        return low, high

    def fake_quantize(self, x: Tensor, keep_input: bool = False, codes: QuantizedCodes | None = None) -> Tensor:
        """Fake-quantize ``x`` with the current parameters, without observing it. ``keep_input``:
        save ``x`` for the backward pass rather than a mask; ``codes``: filled with the result's
        integer codes where they can be (both: see :func:`qat.core.fake_quant.fake_quantize`)."""
        if self.spec.dynamic:
            return self._fake_quantize_per_token(x, codes)
        grad_factor = self.grad_factor(x) if self.spec.learnable else 1.0
        # a signed symmetric zero point is 0 by construction: None skips two passes over x
        zero_point = None if self.zero_point_is_zero and not export_face() else snapshot(self.zero_point)
        # scale / zero_point are buffers this forward may have just updated: see qat.core.snapshot
        return fake_quantize(
            x, snapshot(self.scale), zero_point, self.spec.qmin, self.spec.qmax,
            axis=self.axis, block_size=self.block_size, grad_factor=grad_factor, keep_input=keep_input, codes=codes,
            name=self.export_name,
        )

    def replay(self, source: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """A function that gives, later, the value :meth:`fake_quantize` gives now for the tensor
        ``source()`` returns: the same scale and zero point (copied now; an observer may move
        them before the backward pass runs), no observing, no autograd. For
        :func:`~qat.speed.recompute.recompute_in_backward`."""
        if self.spec.dynamic:  # per-token scales come from the tensor itself
            scale = zero_point = None
        else:
            scale, zero_point = self.scale.detach().clone(), self.zero_point.detach().clone()

        @torch.no_grad()
        def again() -> Tensor:
            x = source()
            if scale is None:
                return self.fake_quantize(x)
            z = None if self.zero_point_is_zero else broadcast_qparam(zero_point, x, self.axis, self.block_size)
            s = broadcast_qparam(scale, x, self.axis, self.block_size)
            if self.spec.learnable:  # what FakeQuantizeFunction's forward computed
                return fake_quantize_math(x, s, torch.zeros_like(s) if z is None else z, self.spec.qmin, self.spec.qmax)
            return fake_quantize_values(x, s, z, self.spec.qmin, self.spec.qmax)

        return again

    def _fake_quantize_per_token(self, x: Tensor, codes: QuantizedCodes | None = None) -> Tensor:
        """Per-token scales depend on ``x`` alone, so layers that read one input with the same
        spec (attention's q/k/v projections, an MLP's gate and up) share one result in eager mode:
        it is kept on ``x`` while ``x`` lives and is unchanged."""
        # inference tensors (torch.inference_mode: Lightning's validation) have no version counter
        shared = not export_face() and not torch.compiler.is_compiling() and not x.is_inference()
        key = (self.spec, x._version, torch.is_grad_enabled()) if shared else None
        cached = getattr(x, "_qat_per_token", None) if shared else None
        if cached is not None and cached[0] == key:
            return cached[1]
        scale, zero_point = self.dynamic_qparams(x)
        if codes is not None:  # the tokens' range check has seen whether x is all finite: see _pass_finiteness
            codes.input_finite = self.tokens_finite
        if self.zero_point_is_zero and not export_face():
            zero_point = None
        y = fake_quantize(x, scale, zero_point, self.spec.qmin, self.spec.qmax, axis=-1, block_size=x.shape[-1], codes=codes,
                          name=self.export_name)
        if shared:
            x._qat_per_token = (key, y)
        return y

    @torch.no_grad()
    def clipped_fraction(self, x: Tensor) -> Tensor:
        """Fraction of ``x`` saturated at the ends of the grid (error beyond half a step), with
        the current parameters, as a 0-dim tensor (no host read)."""
        if self.spec.dynamic:
            scale, axis, block_size = self.dynamic_qparams(x)[0], x.ndim - 1, x.shape[-1]
        else:
            scale, axis, block_size = self.scale, self.axis, self.block_size
        half_step = broadcast_qparam(scale.float().clamp_min(MIN_SCALE), x, axis, block_size) / 2
        error = (x.float() - self.fake_quantize(x).float()).abs()
        return (error > half_step * (1 + 1e-4)).float().mean()  # 1e-4: ties sit exactly on half a step

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold ``x`` into the observer and refresh ``scale`` / ``zero_point`` from it."""
        self.observer(x)
        scale, zero_point = self.observer.qparams()
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, x: Tensor, keep_input: bool = False, factor: Tensor | None = None, codes: QuantizedCodes | None = None) -> Tensor:
        """Observe (when on) and fake-quantize (when on) ``x``, or ``x * factor`` when a factor is
        given (a folded BatchNorm's per-channel factor): then in eager training one autograd node
        does the product and the fake quantization (:func:`~qat.core.fake_quant.fake_quantize_folded`).
        ``codes``: filled with the result's integer codes where they can be (not for a weight
        kept by :attr:`reuse_unchanged`, which is held anyway)."""
        if factor is None and self._reusable(x, keep_input):
            return self._fake_quantize_reusing(x)
        if factor is not None and self._folds_in_one_node(x, factor, keep_input):
            with torch.no_grad():
                folded = x * factor
            if self.observer_enabled:
                self.observe(folded)
                self._pass_finiteness(codes)
            zero_point = None if self.zero_point_is_zero else self.zero_point
            return fake_quantize_folded(x, factor, folded, self.scale, zero_point, self.spec.qmin, self.spec.qmax, axis=self.axis,
                                        codes=codes)
        if factor is not None:
            x = x * factor
        if self.observer_enabled:
            self.observe(x)
            self._pass_finiteness(codes)
        return self.fake_quantize(x, keep_input, codes) if self.fake_quant_enabled else x

    def _pass_finiteness(self, codes: QuantizedCodes | None) -> None:
        """Tell ``codes`` what the observer saw of the tensor it observed, the one about to be
        fake-quantized: whether it is all finite, which spares the codes a NaN check (a pass)."""
        if codes is not None:
            codes.input_finite = self.observer.all_finite

    def _reusable(self, x: Tensor, keep_input: bool) -> bool:
        """Whether :attr:`reuse_unchanged` applies to ``x``: a parameter, fixed scales, an observer
        (if on) whose range is a function of the current weight (observing it twice changes
        nothing), eager autograd outside inference mode (an inference tensor cannot be kept for a
        later backward pass)."""
        if not self.reuse_unchanged or not self._eager_with_fixed_scales(keep_input):
            return False
        # a tuple, not `MinMaxObserver | MSEObserver`: Dynamo in torch 2.9 cannot trace a types.UnionType
        observer_idempotent = (not self.observer_enabled
                               or (isinstance(self.observer, (MinMaxObserver, MSEObserver)) and not self.observer.accumulate))
        return isinstance(x, nn.Parameter) and observer_idempotent and not torch.is_inference_mode_enabled()

    def _fake_quantize_reusing(self, x: Tensor) -> Tensor:
        """:meth:`forward` for a weight whose value and mask are kept: computed (observing first)
        when the weight or the scale changed since, else the kept ones, as a new autograd node."""
        key = (id(x), x.data_ptr(), x._version, self.observer_enabled)
        kept = self._kept
        if kept is None or kept[0] != key or kept[1] != (self.scale._version, self.zero_point._version):
            if self.observer_enabled:
                self.observe(x)
            zero_point = None if self.zero_point_is_zero else self.zero_point
            y, inside = fake_quantize_kept(x, self.scale, zero_point, self.spec.qmin, self.spec.qmax,
                                           axis=self.axis, block_size=self.block_size)
            kept = self._kept = (key, (self.scale._version, self.zero_point._version), y, inside)
        return reuse_fake_quantized(x, kept[2], kept[3])

    def _folds_in_one_node(self, x: Tensor, factor: Tensor, keep_input: bool) -> bool:
        """Whether :func:`~qat.core.fake_quant.fake_quantize_folded` applies: eager training with fixed
        per-tensor or per-channel parameters, float32 operands of one shape (after broadcasting,
        ``x``'s). Elsewhere the product and the fake quantization are two ops (compiled graphs
        fuse them anyway)."""
        return (
            self._eager_with_fixed_scales(keep_input) and self.block_size == 0 and torch.is_grad_enabled()
            and x.dtype == factor.dtype == torch.float32 and _broadcasts_to(factor.shape, x.shape)
        )

    def _eager_with_fixed_scales(self, keep_input: bool) -> bool:
        """What the one-node paths (:meth:`_reusable`, :meth:`_folds_in_one_node`) need: eager
        mode (neither compiling nor exporting), fake quantization on, fixed scales (not learnable,
        not per-token), and a mask to save (``keep_input`` saves the input instead)."""
        return (
            not torch.compiler.is_compiling() and not export_face() and self.fake_quant_enabled and not keep_input
            and not self.spec.learnable and not self.spec.dynamic
        )

    def extra_repr(self) -> str:
        flags = f"observe={self.observer_enabled}, fake_quant={self.fake_quant_enabled}"
        return f"{self.spec.describe()}, role={self.role}, {flags}"


def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` unchanged: ``torch.broadcast_shapes(shape,
    target) == target``, without the tens of microseconds that one takes in eager mode."""
    return len(shape) <= len(target) and all(n in (1, t) for n, t in zip(reversed(shape), reversed(target)))
