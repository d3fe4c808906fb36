"""QAT under FSDP2 (``torch.distributed.fsdp.fully_shard``) in a plain PyTorch loop.

FSDP2 all-gathers a module's parameters before that module's forward runs, so a quantized layer's
weight quantizer sees the whole weight, and weight observers and fake quantization need nothing
more. Two things do:

- ``fully_shard`` refuses 0-d parameters, and a learnable per-tensor scale or zero point is one.
  Quantizer parameters are a few numbers per layer, so they stay replicated on every rank (they
  are passed to ``fully_shard`` as ``ignored_params``);
- FSDP reduces the gradients of the parameters it shards only, so the gradients of those
  replicated parameters are averaged across ranks here, as DDP would, when backward has
  accumulated them: every rank then takes the same optimizer step and holds the same scales.

Activation observers all-reduce their ranges whenever ``torch.distributed`` is initialised
(:mod:`qat.core.observers`), under FSDP2 as under DDP.

Example (on each rank, after ``dist.init_process_group``)::

    model = qat.prepare(model, recipe, example_inputs=x)
    qat.calibrate(model, batches)
    fully_shard_prepared(model)            # each quantized layer, then the whole model
    optimizer = torch.optim.AdamW(model.parameters())
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qat.core.quantizer import Quantizer
from qat.errors import QATError
from qat.modules import QuantizedLayer


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of ``model``'s quantizers (scales, zero points)."""
    return list(dict.fromkeys(p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()))


def _average_across_ranks(parameter: torch.Tensor) -> None:
    """Post-accumulate-grad hook: the mean of the gradient over every rank."""
    if parameter.grad is not None:
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad.div_(dist.get_world_size())


def fully_shard_prepared(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Apply ``fully_shard`` to every quantized layer of a prepared ``model`` and then to the model,
    with the quantizers' parameters replicated and their gradients averaged across ranks (module
    docstring). ``fsdp_kwargs`` go to each ``fully_shard`` call (``mesh``, ``reshard_after_forward``,
    ``mp_policy``…). Returns ``model``, sharded in place."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise QATError("fully_shard_prepared needs torch.distributed: call dist.init_process_group first")
    if "ignored_params" in fsdp_kwargs:
        raise QATError("fully_shard_prepared sets ignored_params itself (the quantizers' parameters)")
    replicated = quantizer_parameters(model)
    ignored = set(replicated)
    for layer in [m for m in model.modules() if isinstance(m, QuantizedLayer)]:
        fully_shard(layer, ignored_params=ignored, **fsdp_kwargs)
    fully_shard(model, ignored_params=ignored, **fsdp_kwargs)
    for parameter in replicated:
        parameter.register_post_accumulate_grad_hook(_average_across_ranks)
    return model
