"""Observers: the range statistics a quantizer turns into scales.

Each observer keeps ``min_val`` / ``max_val`` buffers in the quantizer's scale layout (see
:class:`~qat.core.spec.QuantSpec`), so the per-channel and per-group variants are the same classes
reducing over other groups. Statistics only: scales come from :func:`~qat.core.qparams.qparams_from_range`.

- ``minmax``: running min/max over everything seen (activations, as torch.ao's
  ``MinMaxObserver``); for weights (``accumulate=False``) the range of the current weight.
- ``moving_average_minmax``: exponential moving average of each batch's min/max; the first batch
  sets the range (torch.ao's ``MovingAverage*MinMaxObserver``).
- ``percentile`` (activations): moving average of each batch's ``100 - p`` and ``p`` percentiles
  (linear interpolation, as ``torch.quantile``), which ignores rare outliers.
- ``mse`` (weights): for each group, the clipping of the min/max range (ratios from 1 down to
  :data:`MSE_MIN_RATIO`) whose fake-quantized tensor has the smallest squared error. It costs
  :data:`MSE_STEPS` fake-quant passes over the weight: use it to calibrate, then freeze it.

A weight observer given the same parameter again, unchanged (its version counter has not moved),
keeps its range without looking: calibration's later batches cost no weight statistics.

Non-finite values (NaN, ±inf) are ignored: they never enter a range, and a batch with no finite
value in a group leaves that group's range as it was. No observer reads a tensor value on the
host on an accelerator (no ``.item()``), so observing never synchronises a GPU step; on the CPU,
where a host read is free, :func:`finite_range` reads one flag to skip masking finite tensors. When ``torch.distributed`` is
initialised and ``sync`` is on (activations), each batch's statistics are all-reduced before they
are folded in (min/max: MIN/MAX; percentiles: mean), so every rank holds the same range. Weight
observers need no reduction: data-parallel training keeps weights identical on every rank.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from qat.core import faster
from qat.core.fake_quant import fake_quantize_math, host_reads_are_free
from qat.core.qparams import qparams_from_range
from qat.core.spec import Granularity, ObserverKind, QuantSpec

MSE_STEPS = 100
"""Number of clipping ratios the ``mse`` observer tries, evenly spaced from 1 to MSE_MIN_RATIO."""
MSE_MIN_RATIO = 0.2
"""Smallest fraction of the min/max range the ``mse`` observer tries."""
_MSE_CHUNK_ELEMENTS = 1 << 24  # candidates evaluated together: bounds the search's memory


def reduce_groups(x: Tensor, spec: QuantSpec, axis: int, reduce: Callable[[Tensor], Tensor | tuple[Tensor, ...]]):
    """Apply ``reduce`` to each group of elements that shares one scale.

    ``reduce`` takes rows ``(..., K)`` and reduces the last dimension; the result comes back in the
    scale layout of ``spec`` (a tuple of results when ``reduce`` returns a tuple). Blocked groups
    are padded with NaN, which the reductions here ignore.
    """
    gran = spec.granularity
    if gran is Granularity.PER_TENSOR:
        rows, restore = x.reshape(-1), lambda t: t
    elif gran is Granularity.PER_CHANNEL:
        rows, restore = x.movedim(axis, 0).reshape(x.shape[axis], -1), lambda t: t
    elif gran is Granularity.PER_GROUP or spec.group_size is not None:  # blocks (per-token ones run along the last axis)
        rows = x.movedim(axis, -1)
        pad = -rows.shape[-1] % spec.group_size
        if pad:
            rows = F.pad(rows, (0, pad), value=float("nan"))
        rows = rows.reshape(*rows.shape[:-1], -1, spec.group_size)  # (..., n_blocks, group_size)
        restore = lambda t: t.movedim(-1, axis)  # noqa: E731
    else:  # per_token, whole rows: the last dimension
        rows, restore = x, lambda t: t.unsqueeze(-1)
    out = reduce(rows)
    return tuple(map(restore, out)) if isinstance(out, tuple) else restore(out)


def finite_range(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max of each row over its finite values (``+inf, -inf`` when there are none), in
    float32 for rows of any float dtype (one Triton kernel on a GPU in eager mode, :mod:`qat.speed`)."""
    low, high, _ = finite_range_checked(rows)
    return low, high


def finite_range_checked(rows: Tensor) -> tuple[Tensor, Tensor, bool]:
    """:func:`finite_range`, and whether every value of ``rows`` is finite: True where that was
    seen on the way (on the CPU, from the one flag read below), False where it is not known."""
    wing = faster.wing()
    if wing is not None and (fast := wing.finite_range(rows)) is not None:
        return *fast, False
    rows = rows.float()
    if host_reads_are_free(rows):
        # on the CPU a host read costs nothing: when every row's plain min and max are finite (no
        # NaN or inf anywhere), they are the answer, in two passes instead of five
        low, high = rows.amin(-1), rows.amax(-1)
        # finite when the spreads' sum is: three small ops rather than isfinite's ten (an overflow
        # of the sum only sends finite rows down the masked path, which gives the same answer)
        if math.isfinite((high - low).sum().item()):
            return low, high, True
    finite = torch.isfinite(rows)
    return rows.masked_fill(~finite, float("inf")).amin(-1), rows.masked_fill(~finite, float("-inf")).amax(-1), False


def both_finite(a: Tensor, b: Tensor) -> Tensor:
    """``isfinite(a) & isfinite(b)`` in four small ops instead of nine (``isfinite`` is four on its
    own): ``x * 0`` is ±0 for a finite ``x`` and NaN for ±inf or NaN."""
    return (a * 0 + b * 0) == 0


def finite_percentiles(rows: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """The ``low`` and ``high`` percentiles (0–100) of each row's finite values; NaN when none.

    Linear interpolation between order statistics, as ``torch.quantile`` and ``numpy.percentile``
    do, but without their size limit and with non-finite values left out.
    """
    finite = torch.isfinite(rows)
    count = finite.sum(-1, keepdim=True)
    ordered = rows.masked_fill(~finite, float("nan")).sort(-1).values  # NaN sort last

    def at(percent: float) -> Tensor:
        pos = (count - 1).clamp_min(0) * (percent / 100)
        below = pos.floor()
        above = torch.minimum(below + 1, (count - 1).clamp_min(0))
        lo, hi = ordered.gather(-1, below.long()), ordered.gather(-1, above.long())
        return (lo + (hi - lo) * (pos - below)).squeeze(-1)

    return at(low), at(high)


def world_size() -> int:
    """How many processes share the data (``torch.distributed``'s world), 1 outside a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: Tensor, op: dist.ReduceOp) -> None:
    if world_size() > 1:
        dist.all_reduce(t, op=op)


class Observer(nn.Module):
    """Base observer: running min/max in the scale layout of ``spec``.

    Args:
        spec: the quantizer's spec (granularity, group size, bits for MSE).
        shape: shape of the observed tensor; needed for ``per_channel`` and ``per_group``.
        axis: resolved channel / block axis.
        accumulate: fold each batch into the running range (activations) or replace the range by
            the latest tensor's (weights).
        sync: all-reduce each batch's statistics across ``torch.distributed`` ranks.
    """

    def __init__(
        self, spec: QuantSpec, shape: Sequence[int] = (), axis: int = 0, *, accumulate: bool = True, sync: bool = True
    ) -> None:
        super().__init__()
        self.spec, self.axis, self.accumulate, self.sync = spec, axis, accumulate, sync
        # whether a weight given again unchanged (by its version counter and storage) may keep its range;
        # off under FSDP2, which refills a gathered weight in place without moving its version (qat.training.sharding)
        self.skip_unchanged_weights = True
        qshape = spec.qparam_shape(shape, axis)
        self.register_buffer("min_val", torch.full(qshape, float("inf")))
        self.register_buffer("max_val", torch.full(qshape, float("-inf")))
        # whether the last tensor observed was seen to hold only finite values (False: not known);
        # set on the CPU by the min/max observers, whose range check reads it anyway. It lets
        # combine() skip its per-group checks, and a caller about to fake-quantize the same tensor
        # skip a NaN check of its own (qat.speed.codes.QuantizedCodes.input_finite)
        self.all_finite = False

    @torch.no_grad()
    def forward(self, x: Tensor) -> None:
        """Fold ``x`` into the range. A weight observer given the same parameter again, unchanged
        since it last saw it, keeps its range: calibration runs every batch through the model,
        and an MSE search over an LLM's weights per batch would cost minutes each."""
        if self._seen_unchanged(x):
            return
        self.all_finite = False
        low, high = self.batch_range(x.detach())
        if self.sync:
            low, high = self.all_reduce(low, high)
        low, high = self.combine(low, high)
        self.min_val.copy_(low)
        self.max_val.copy_(high)
        if (version := self._weight_version(x)) is not None:
            _last_weight[self] = (weakref.ref(x), version)

    def _weight_version(self, x: Tensor) -> tuple[int, ...] | None:
        """For a weight observer (``accumulate=False``: its range is the current tensor's) given a
        parameter, what tells that parameter and this range unchanged: their version counters,
        which every in-place update (an optimizer step, ``copy_``, a loaded state) moves, and the
        parameter's storage. None for anything else (an activation, a folded weight made anew each
        call), which is always observed."""
        # compiling first: Dynamo cannot trace is_inference(), and a compiled graph observes every call
        if (torch.compiler.is_compiling() or self.accumulate or not self.skip_unchanged_weights
                or not isinstance(x, nn.Parameter) or x.is_inference()):
            return None
        return x._version, x.data_ptr(), self.min_val._version, self.max_val._version

    def _seen_unchanged(self, x: Tensor) -> bool:
        """Whether ``x`` is the parameter this observer last observed, and neither has changed since."""
        version = self._weight_version(x)
        last = _last_weight.get(self) if version is not None else None
        return last is not None and last[0]() is x and last[1] == version

    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's range per group, float32 (``+inf, -inf`` / NaN where a group has no finite
        value), from ``x`` in its own dtype: the min and max of bf16 values are exact in float32,
        so no float32 copy of ``x`` is made."""
        return reduce_groups(x, self.spec, self.axis, self._checked_range)

    def _checked_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        low, high, self.all_finite = finite_range_checked(rows)
        return low, high

    def all_reduce(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        """Make every rank's batch range the same: the union of the ranks' ranges."""
        _all_reduce(low, dist.ReduceOp.MIN)
        _all_reduce(high, dist.ReduceOp.MAX)
        return low, high

    def combine(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        """The new range from the old one and this batch's."""
        if self.accumulate:
            return torch.minimum(self.min_val, low), torch.maximum(self.max_val, high)
        if self.all_finite:  # every group has a finite range: `seen` would be all True
            return low, high
        seen = both_finite(low, high)
        return torch.where(seen, low, self.min_val), torch.where(seen, high, self.max_val)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point for the current range."""
        return qparams_from_range(self.min_val, self.max_val, self.spec)

    def reset(self) -> None:
        """Forget everything observed."""
        _last_weight.pop(self, None)
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def extra_repr(self) -> str:
        return f"{self.spec.granularity.value}, shape={tuple(self.min_val.shape)}, accumulate={self.accumulate}"


_last_weight: weakref.WeakKeyDictionary[Observer, tuple[weakref.ref, tuple[int, ...]]] = weakref.WeakKeyDictionary()
"""A weight observer → the parameter it last observed and that parameter's version then. Kept
outside the module, so observers still pickle and copy (a copy observes its weight afresh)."""


class MinMaxObserver(Observer):
    """Running min/max (activations) or the current tensor's min/max (weights)."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min/max; the first batch sets the range."""

    def combine(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        c = self.spec.averaging_constant
        first = torch.isinf(self.min_val) | torch.isinf(self.max_val)
        new_low = torch.where(first, low, self.min_val + c * (low - self.min_val))
        new_high = torch.where(first, high, self.max_val + c * (high - self.max_val))
        if self.all_finite:  # every group has a finite range: `seen` would be all True
            return new_low, new_high
        seen = both_finite(low, high)
        return torch.where(seen, new_low, self.min_val), torch.where(seen, new_high, self.max_val)


class PercentileObserver(MovingAverageMinMaxObserver):
    """Moving average of each batch's ``100 - p`` and ``p`` percentiles (for activations)."""

    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.spec.percentile
        return reduce_groups(x.float(), self.spec, self.axis, lambda rows: finite_percentiles(rows, 100 - p, p))

    def all_reduce(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        """The mean of the ranks' percentiles (a percentile of the union needs all the data)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (low, high):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(dist.get_world_size())
        return low, high


class MSEObserver(Observer):
    """Clipping search: the shrunk min/max range with the least fake-quantization error."""

    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return reduce_groups(x.float(), self.spec, self.axis, self._search)

    def _search(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        low, high = finite_range(rows)  # (S...)
        finite = torch.isfinite(rows)
        values = rows.masked_fill(~finite, 0.0)
        ratios = torch.linspace(1.0, MSE_MIN_RATIO, MSE_STEPS, device=rows.device)
        best_err = torch.full_like(low, float("inf"))
        best_ratio = torch.ones_like(low)
        chunk = max(1, _MSE_CHUNK_ELEMENTS // max(1, rows.numel()))
        for start in range(0, MSE_STEPS, chunk):
            r = ratios[start : start + chunk].reshape(-1, *([1] * low.ndim))  # (c, 1...)
            scale, zero_point = qparams_from_range(low * r, high * r, self.spec)  # (c, S...)
            fq = fake_quantize_math(values, scale.unsqueeze(-1), zero_point.unsqueeze(-1), self.spec.qmin, self.spec.qmax)
            err = ((fq - values) ** 2 * finite).sum(-1)  # (c, S...)
            chunk_err, chunk_idx = err.min(0)
            better = chunk_err < best_err
            best_err = torch.where(better, chunk_err, best_err)
            best_ratio = torch.where(better, r.flatten()[chunk_idx], best_ratio)
        return low * best_ratio, high * best_ratio


OBSERVERS: dict[ObserverKind, type[Observer]] = {
    ObserverKind.MINMAX: MinMaxObserver,
    ObserverKind.MOVING_AVERAGE_MINMAX: MovingAverageMinMaxObserver,
    ObserverKind.PERCENTILE: PercentileObserver,
    ObserverKind.MSE: MSEObserver,
}


def make_observer(spec: QuantSpec, shape: Sequence[int] = (), axis: int = 0, *, accumulate: bool = True, sync: bool = True) -> Observer:
    """The observer ``spec.observer`` names, sized for a tensor of ``shape``."""
    return OBSERVERS[spec.observer](spec, shape, axis, accumulate=accumulate, sync=sync)
