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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qat.core import faster
from qat.core.fake_quant import MIN_SCALE, broadcast_qparam, fake_quantize, guarded, integer_codes
from qat.core.observers import finite_range_checked, make_observer, reduce_groups, world_size
from qat.core.qparams import qparams_from_range
from qat.core.snapshot import snapshot
from qat.core.spec import Granularity, QuantSpec, Role
from qat.errors import QATError


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
    scale are unchanged (:func:`qat.set_weight_reuse`; a path of :mod:`qat.speed`)."""

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
        self.zero_point_is_zero = spec.fixed_zero_point and spec.symmetric_zero_point == 0

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
        if not isinstance(state, Mapping):
            # torch.distributed.checkpoint's placeholder (`_EXTRA_STATE`) for an extra state it does not carry: loading a full
            # checkpoint into a fully_shard-ed model, Lightning sets one parameter at a time, and torch passes the
            # placeholder for every extra state below it. The switches then stay as they are (the QAT schedule sets them).
            return
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
        """LSQ's gradient scale ``1 / sqrt(N * qmax)``, N = elements per scale.

        An activation is the rank's share of the batch under data parallelism (DDP, FSDP2), where
        the ranks' gradients are averaged, so N counts every rank's elements: the averaged gradient
        is then the one a single process gets from the whole batch. A weight is whole on every rank."""
        per_scale = max(1, x.numel() // max(1, self.scale.numel()))
        if self.role == "activation":
            per_scale *= world_size()
        return 1.0 / math.sqrt(per_scale * max(1, self.spec.qmax))

    def dynamic_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token scale and zero point of ``x`` (shape ``(..., 1)``, or one per block of the last
        dimension with ``group_size``), from its own range.

        Snapshotted so a compiled backward reuses them: recomputed there with other arithmetic,
        a row's maximum — which sits exactly on the tie ``(qmax - qmin) / 2`` — can round the
        other way and flip its straight-through mask."""
        return self.dynamic_qparams_checked(x)[:2]

    def dynamic_qparams_checked(self, x: Tensor) -> tuple[Tensor, Tensor, bool]:
        """:meth:`dynamic_qparams`, and whether ``x`` was seen all finite on the way (False: not
        known), as :attr:`qat.core.observers.Observer.all_finite`."""
        finite = [False]

        def token_range(rows: Tensor) -> tuple[Tensor, Tensor]:
            low, high, finite[0] = finite_range_checked(rows)
            return low, high

        low, high = reduce_groups(x.detach(), self.spec, x.ndim - 1, token_range)
        scale, zero_point = qparams_from_range(low, high, self.spec)
        return snapshot(scale), snapshot(zero_point), finite[0]

    def token_block(self, x: Tensor) -> int:
        """Elements of ``x``'s last dimension that share a dynamic scale: the spec's ``group_size``, or the whole row."""
        return self.spec.group_size or x.shape[-1]

    def fake_quantize(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` with the current parameters, without observing it."""
        if self.spec.dynamic:
            scale, zero_point = self.dynamic_qparams(x)
            axis, block_size = -1, self.token_block(x)
        else:
            # scale / zero_point are buffers this forward may have just updated: see qat.core.snapshot
            scale, zero_point, axis, block_size = snapshot(self.scale), snapshot(self.zero_point), self.axis, self.block_size
        grad_factor = self.grad_factor(x) if self.spec.learnable else 1.0
        return fake_quantize(x, scale, zero_point, self.spec.qmin, self.spec.qmax, axis=axis, block_size=block_size,
                             grad_factor=grad_factor, name=self.export_name)

    @torch.no_grad()
    def codes(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, scale, zero_point)`` of ``x`` with the current parameters (a static spec),
        each in ``x``'s shape: int32 codes, the float32 scale and int32 zero point that apply to
        each element, so ``(codes - zero_point) * scale`` is :meth:`fake_quantize`'s value. What an
        exporter writes when it stores a weight in another layout than ONNX's (MatMulNBits blocks)."""
        if self.spec.dynamic:
            raise QATError("a per-token quantizer has no fixed codes: its scales come from each input")
        s, z = guarded(self.scale, self.zero_point, self.spec.qmin, self.spec.qmax)
        s, z = (broadcast_qparam(p, x, self.axis, self.block_size).expand_as(x) for p in (s, z))
        return integer_codes(x, s, z, self.spec.qmin, self.spec.qmax).int(), s, z.int()

    @torch.no_grad()
    def clipped_fraction(self, x: Tensor) -> Tensor:
        """Fraction of ``x`` saturated at the ends of the grid (error beyond half a step), with
        the current parameters, as a 0-dim tensor (no host read)."""
        if self.spec.dynamic:
            scale, axis, block_size = self.dynamic_qparams(x)[0], x.ndim - 1, self.token_block(x)
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

    def rows(self, table: Tensor, lookup: Callable[[Tensor], Tensor]) -> Tensor:
        """``lookup(self(table))`` for a lookup that picks whole rows (an embedding's), with only
        the picked rows fake-quantized: observe the whole table (when on), then fake-quantize
        ``lookup(table)`` with ``lookup`` of the scale and zero point, laid out one row each.
        For scales that are each row's own (per tensor, per channel along axis 0, per group along
        axis 1); the values are those of quantizing the whole table, and the gradients the same
        sums, added in another order."""
        if self.observer_enabled:
            self.observe(table)
        picked = lookup(table)
        if not self.fake_quant_enabled:
            return picked
        # buffers this call may have just updated: see qat.core.snapshot (as in fake_quantize)
        scale, zero_point, block_size = snapshot(self.scale), snapshot(self.zero_point), 0
        if scale.ndim:  # one row of scales per table row: (num,) per channel, (num, groups) per group
            scale, zero_point = (lookup(p.reshape(len(table), -1)) for p in (scale, zero_point))
            block_size = self.block_size or table.shape[1]
        grad_factor = self.grad_factor(table) if self.spec.learnable else 1.0
        return fake_quantize(picked, scale, zero_point, self.spec.qmin, self.spec.qmax, axis=-1, block_size=block_size,
                             grad_factor=grad_factor)

    def forward(self, x: Tensor, factor: Tensor | None = None, request: object = None) -> Tensor:
        """Observe (when on) and fake-quantize (when on) ``x``, or ``x * factor`` when a factor is
        given (a folded BatchNorm's per-channel factor). The speed wing's faster equivalent when
        it has one (:mod:`qat.core.faster`), else the plain path; ``request``: the speed wing's
        own options for this call, passed to it untouched (a quantized layer's)."""
        wing = faster.wing()
        if wing is not None and (y := wing.quantizer_forward(self, x, factor, request)) is not None:
            return y
        if factor is not None:
            x = x * factor
        if self.observer_enabled:
            self.observe(x)
        return self.fake_quantize(x) if self.fake_quant_enabled else x

    def extra_repr(self) -> str:
        flags = f"observe={self.observer_enabled}, fake_quant={self.fake_quant_enabled}"
        return f"{self.spec.describe()}, role={self.role}, {flags}"

