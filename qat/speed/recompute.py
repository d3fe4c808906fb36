"""Keep a layer's fake-quantized operands out of the saved activations: recompute them in backward.

A convolution or matmul saves its operands for the backward pass. In a float model those are the
layer's input (usually saved by its producer anyway) and its weight (a parameter, kept anyway).
In a quantized layer they are new tensors, ``Q(x)`` and ``Q(W)``: saving them costs one more copy
of every weight and of every quantized activation, and when several layers read one input
(attention's q/k/v projections) one copy each. :func:`recompute_in_backward` saves instead a way
to make them again, from the float tensor and the scale the forward used; the backward
recomputes them (a few elementwise passes) when it needs them. The values are the same, bit for
bit: the same operations on the same numbers.

Eager mode only: under ``torch.compile`` the partitioner makes this choice itself, and an outer
``saved_tensors_hooks`` (activation checkpointing, ``save_on_cpu``) is left to do its own job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class _Recomputed:
    """A saved operand: how to make it again, shared by every view of it that an op saves, and
    the strides it had, which the views are taken with: a remade tensor laid out otherwise is
    copied into them (elementwise ops lay a result out as their input, so this is rare)."""

    __slots__ = ("make", "stride", "value")

    def __init__(self, make: Callable[[], Tensor], stride: tuple[int, ...]) -> None:
        self.make, self.stride, self.value = make, stride, None

    def get(self) -> Tensor:
        if self.value is None:
            value = self.make()
            if value.stride() != self.stride:
                value = torch.empty_strided(value.shape, self.stride, dtype=value.dtype, device=value.device).copy_(value)
            self.value = value
        return self.value


class _SavedView:
    __slots__ = ("offset", "size", "source", "stride")

    def __init__(self, source: _Recomputed, t: Tensor) -> None:
        self.source, self.size, self.stride, self.offset = source, t.size(), t.stride(), t.storage_offset()

    def unpack(self) -> Tensor:
        return self.source.get().as_strided(self.size, self.stride, self.offset)


def _dense(t: Tensor) -> bool:
    """Whether ``t`` fills its storage from offset 0 without gaps, in one of the layouts PyTorch
    makes (contiguous, channels last): a saved view of it is then a view of any tensor of the
    same size and strides."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    dense = t.is_contiguous() or (t.ndim in formats and t.is_contiguous(memory_format=formats[t.ndim]))
    return dense and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def active(*tensors: Tensor | None) -> bool:
    """True when recomputing pays and is safe here: eager autograd, some operand needs a
    gradient path, and no outer saved-tensor hooks are set."""
    return (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and any(t is not None and t.requires_grad for t in tensors)
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


def unchanged(t: Tensor) -> Callable[[], Tensor]:
    """A source for a recomputed operand (:mod:`qat.speed.wing`): ``t`` as it is now. It raises, as
    autograd does for saved tensors, if ``t`` was modified in place before the backward pass."""
    t, version = t.detach(), t._version  # a detached tensor shares its base's version counter

    def get() -> Tensor:
        if t._version != version:
            raise RuntimeError(
                "a quantized layer's input was modified by an in-place operation after the layer read it; "
                "its backward pass needs the original (make the later operation out of place)"
            )
        return t

    return get


@contextmanager
def recompute_in_backward(operands: dict[Tensor, Callable[[], Tensor]]) -> Iterator[None]:
    """While the block runs, tensors saved for backward that are (views of) a key of
    ``operands`` are saved as its function instead; the backward calls it once to get the
    tensor back. Each key must be dense (contiguous or channels last; others are saved as they
    are), and its function must return an equal tensor.

    Example:
        >>> import torch
        >>> w = torch.randn(4, 3, requires_grad=True)
        >>> x = torch.randn(2, 3)
        >>> w_half = w * 0.5
        >>> with recompute_in_backward({w_half: lambda: w.detach() * 0.5}):
        ...     y = torch.nn.functional.linear(x, w_half)
        >>> y.sum().backward()
        >>> torch.allclose(w.grad, x.sum(0).expand(4, 3) * 0.5)
        True
    """
    by_storage = {t.untyped_storage().data_ptr(): _Recomputed(make, t.stride()) for t, make in operands.items() if _dense(t)}

    def pack(t: Tensor):
        source = by_storage.get(t.untyped_storage().data_ptr())
        return t if source is None else _SavedView(source, t)

    def unpack(saved):
        return saved.unpack() if isinstance(saved, _SavedView) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
