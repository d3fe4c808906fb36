"""Dataloader batches → model inputs: what calibration, export and the recipe runner feed a model.

A batch is a tensor, ``(inputs, targets)`` or a mapping of keyword arguments (Hugging Face
batches, whose ``labels`` are targets).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from qat.errors import QATError

TARGET_KEYS = ("labels",)
"""Mapping keys that are targets, not model inputs (Hugging Face batches carry ``labels``)."""


def batch_inputs(batch: Any) -> Any:
    """A model's forward inputs from a dataloader batch: a tensor as is, the first element of a
    tuple or list (``(x, y)``), a mapping as keyword arguments (Hugging Face batches), as given."""
    if isinstance(batch, Tensor | Mapping):
        return batch
    if isinstance(batch, Sequence) and batch and not isinstance(batch, str):
        return batch[0]
    raise QATError(f"cannot tell the model inputs in a batch of type {type(batch).__name__}; set `example_input_array` on the "
                   "LightningModule or pass example_inputs= to QuantizationAwareTraining")


def first_batch(dataloaders: Callable[[], Any]) -> Any:
    """The first batch of the dataloader that ``dataloaders()`` makes (of the first one, for a
    mapping or sequence of them, as Lightning allows), leaving the global RNG as it was: a
    shuffling sampler draws its seed from it, and a run must not depend on this peek. The
    dataloader is made inside too, so a ``*_dataloader()`` hook that draws random numbers leaves
    no trace either.

    Example:
        >>> loader = torch.utils.data.DataLoader(torch.arange(6.0), batch_size=4, shuffle=True)
        >>> rng = torch.random.get_rng_state()
        >>> first_batch(lambda: loader).shape, torch.equal(rng, torch.random.get_rng_state())
        (torch.Size([4]), True)
    """
    with torch.random.fork_rng(devices=[]):
        loaders = dataloaders()
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()))
        elif isinstance(loaders, Sequence):
            loaders = loaders[0]
        return next(iter(loaders))


def model_inputs(batch: Any) -> Any:
    """:func:`batch_inputs` without the targets: what the model is called with at deployment."""
    inputs = batch_inputs(batch)
    if isinstance(inputs, Mapping):
        inputs = {k: v for k, v in inputs.items() if k not in TARGET_KEYS}
    return inputs


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)``, on the model's device."""
    parameter = next(model.parameters(), None)
    if parameter is not None:
        inputs = tree_map(lambda t: t.to(parameter.device) if isinstance(t, Tensor) else t, inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def rebatch(batches: Sequence[Any], size: int) -> list[Any]:
    """The same samples cut into batches of ``size`` (the last, incomplete one dropped): inputs
    for a model exported with a fixed batch size. Every batch has the structure of the first.

    Example:
        >>> [b.shape[0] for b in rebatch([torch.zeros(5, 2), torch.zeros(4, 2)], 3)]
        [3, 3, 3]
    """
    if size < 1:
        raise QATError(f"batch size must be ≥ 1; got {size}")
    if not batches:
        return []
    columns, spec = None, None
    for batch in batches:
        leaves, batch_spec = tree_flatten(batch)
        if spec is None:
            columns, spec = [[] for _ in leaves], batch_spec
        elif batch_spec != spec:
            raise QATError("batches to re-cut must all have the same structure")
        for column, leaf in zip(columns, leaves, strict=True):
            column.append(leaf)
    joined = [torch.cat(column) for column in columns]
    total = joined[0].shape[0]
    return [tree_unflatten([t[i : i + size] for t in joined], spec) for i in range(0, total - size + 1, size)]
