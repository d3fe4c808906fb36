"""`snapshot`: read mutable state so that a compiled backward sees the value the forward saw.

Under ``torch.compile``, AOTAutograd's min-cut partitioner may recompute a value in the backward
instead of saving it. When that value was computed from a buffer that the same forward then
updates in place (a BatchNorm's ``running_var``, an observer's running range), the recomputation
reads the *updated* buffer and the gradients come out silently wrong (PyTorch PR #197039, "Don't
recompute reads of mutated inputs or mutable buffers", open as of torch 2.14). Seen here: with
BatchNorm folding, the compiled conv-weight gradients differed from eager by O(1).

A custom op is not on the partitioner's recompute allow-list, so passing such a read through
``qat::snapshot`` (a copy; identity gradient) forces the value to be saved. The copy is of small
tensors (scales, per-channel statistics). Eager mode needs no copy, and skips the dozens of small
operations a step would spend on them.

Inductor is told to compile the op as the copy it is (:func:`_lower_in_inductor`): the partitioner,
which runs before Inductor's lowering, still sees an op it cannot recompute and saves the copy, but
the compiled step no longer calls back into Python for it (about 200 calls a ResNet-50 step, tens
of microseconds each, plus one small kernel each) and the copy fuses into the kernel that computes
its input.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qat.core.fake_quant import export_face


@functools.cache
def _lower_in_inductor() -> None:
    """Register Inductor's lowering of ``aten.clone`` for ``qat::snapshot``, once, when a compiler first
    traces a snapshot (so that importing ``qat`` does not import Inductor, 1.7 s). Without it Inductor
    calls the op's Python implementation at every step. ``torch._inductor.lowering`` is internal:
    where it is missing or different, the op stays a call, which is correct, only slower."""
    try:
        from torch._inductor.lowering import clone, lowerings, register_lowering

        if torch.ops.qat.snapshot.default not in lowerings:
            register_lowering(torch.ops.qat.snapshot.default, type_promotion_kind=None)(clone)
    except (ImportError, AttributeError, TypeError):
        pass


@torch.library.custom_op("qat::snapshot", mutates_args=())
def _snapshot_op(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot_op.register_fake
def _(t):
    _lower_in_inductor()  # the fake kernel runs as Python while Dynamo and AOTAutograd trace, before Inductor lowers
    return torch.empty_like(t)


_snapshot_op.register_autograd(lambda ctx, grad: grad)


def snapshot(t: Tensor) -> Tensor:
    """Under ``torch.compile``, a copy of ``t`` that the compiled backward saves instead of
    recomputing; ``t`` itself in eager mode, where nothing is recomputed, and while ``torch.export``
    traces (an exported graph has no backward)."""
    return _snapshot_op(t) if torch.compiler.is_compiling() and not export_face() else t
