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
"""

from __future__ import annotations

import torch
from torch import Tensor

from qat.fake_quant import export_face


@torch.library.custom_op("qat::snapshot", mutates_args=())
def _snapshot_op(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot_op.register_fake
def _(t):
    return torch.empty_like(t)


_snapshot_op.register_autograd(lambda ctx, grad: grad)


def snapshot(t: Tensor) -> Tensor:
    """Under ``torch.compile``, a copy of ``t`` that the compiled backward saves instead of
    recomputing; ``t`` itself in eager mode, where nothing is recomputed, and while ``torch.export``
    traces (an exported graph has no backward)."""
    return _snapshot_op(t) if torch.compiler.is_compiling() and not export_face() else t
