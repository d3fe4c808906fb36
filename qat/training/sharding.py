"""QAT under FSDP2 (``torch.distributed.fsdp.fully_shard``): in a plain PyTorch loop, and what the
Lightning callback calls under ``ModelParallelStrategy``.

FSDP2 all-gathers a module's parameters before that module's forward runs, so a quantized layer's
weight quantizer sees the whole weight, and weight observers and fake quantization need nothing
more. Three things do:

- ``fully_shard`` refuses 0-d parameters, and a learnable per-tensor scale or zero point is one.
  Quantizer parameters are a few numbers per layer, so they stay replicated on every rank (they
  are passed to ``fully_shard`` as ``ignored_params``);
- FSDP reduces the gradients of the parameters it shards only, so the gradients of those
  replicated parameters are averaged across ranks here, as DDP would, when backward has
  accumulated them: every rank then takes the same optimizer step and holds the same scales;
- FSDP leaves buffers alone, so BatchNorm running statistics, which a folded convolution's weight
  is multiplied by, are averaged across ranks after each training forward.

Activation observers all-reduce their ranges whenever ``torch.distributed`` is initialised
(:mod:`qat.core.observers`), under FSDP2 as under DDP. Outside a forward pass the weights are
shards; :func:`quantized_layers` gathers them, unit by unit, for what reads them there.

Example (on each rank, after ``dist.init_process_group``)::

    model = qat.prepare(model, recipe, example_inputs=x)
    qat.calibrate(model, batches)
    fully_shard_prepared(model)            # each quantized layer, then the whole model
    optimizer = torch.optim.AdamW(model.parameters())
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qat.core.observers import world_size
from qat.core.quantizer import Quantizer
from qat.errors import QATError
from qat.modules import QuantizedLayer


def named_quantizer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The learnable parameters of ``model``'s quantizers (scales, zero points), by name."""
    named: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            for key, parameter in module.named_parameters(prefix=name):
                named.setdefault(key, parameter)
    return named


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of ``model``'s quantizers: pass them as ``ignored_params`` to every
    ``fully_shard`` call that covers a quantized layer, so they stay replicated."""
    return list(dict.fromkeys(named_quantizer_parameters(model).values()))


def _average_gradient(parameter: torch.Tensor) -> None:
    """Post-accumulate-grad hook: the mean of the gradient over every rank."""
    if parameter.grad is not None:
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad.div_(dist.get_world_size())


def _average_running_statistics(bn: nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook of a training BatchNorm: its running mean and variance averaged over the ranks.

    Written through ``.data``, which leaves the buffers' autograd version counters alone: the
    BatchNorm's backward lists them among its inputs but, in training, computes with the batch's
    statistics, so changing them between forward and backward changes no gradient."""
    if bn.training and world_size() > 1:
        mean, var = bn.running_mean.data, bn.running_var.data
        both = torch.cat([mean, var])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        both.div_(dist.get_world_size())
        mean.copy_(both[:mean.numel()])
        var.copy_(both[mean.numel():])


_HOOKED = "_qat_rank_average"
"""Set on a parameter or BatchNorm once its averaging hook is registered (registering is idempotent)."""


def keep_ranks_in_step(model: nn.Module) -> nn.Module:
    """Make every rank of a ``fully_shard``-ed ``model`` hold the same quantizer state, as DDP does:

    - the gradients of the replicated quantizer parameters are averaged across ranks (FSDP
      reduces only the parameters it shards);
    - each BatchNorm's running statistics are averaged across ranks after every training forward
      (DDP copies rank 0's buffers instead), so every rank folds the same weight and its weight
      quantizer sees the same numbers. As under DDP, each rank still normalises its own share of
      the batch with that share's statistics (``nn.SyncBatchNorm``, GPU only, shares them);
    - every weight observer observes every forward: FSDP2 refills a gathered weight in place
      without moving its version counter, so "the same parameter, unchanged" cannot be told, and a
      rank whose gathered weight landed at the same address would keep a stale range.

    A sharded quantizer parameter is refused: FSDP2 hands a module its whole parameters only
    inside its forward, and a scale is also written outside it (at calibration's end, on load).
    Called by :func:`fully_shard_prepared` and by the Lightning callback; calling it again is harmless.
    """
    from torch.distributed.tensor import DTensor

    for name, parameter in named_quantizer_parameters(model).items():
        if isinstance(parameter, DTensor):
            raise QATError(f"quantizer parameter `{name}` is sharded: pass ignored_params=set(quantizer_parameters(model)) "
                           "(qat.training.sharding) to every fully_shard call, or call fully_shard_prepared(model)")
        if not getattr(parameter, _HOOKED, False):
            parameter.register_post_accumulate_grad_hook(_average_gradient)
            setattr(parameter, _HOOKED, True)
    for module in model.modules():
        if isinstance(module, Quantizer) and module.observer is not None:
            module.observer.skip_unchanged_weights = False
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm)
                and module.track_running_stats and not getattr(module, _HOOKED, False)):
            module.register_forward_hook(_average_running_statistics)
            setattr(module, _HOOKED, True)
    return model


def fully_shard_prepared(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Apply ``fully_shard`` to every quantized layer of a prepared ``model`` (layers that share a
    parameter, such as a tied embedding and head, together) and then to the model, with the
    quantizers' parameters replicated, and keep the ranks in step
    (:func:`keep_ranks_in_step`). ``fsdp_kwargs`` go to each ``fully_shard`` call (``mesh``,
    ``reshard_after_forward``, ``mp_policy``…). Returns ``model``, sharded in place."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise QATError("fully_shard_prepared needs torch.distributed: call dist.init_process_group first")
    if "ignored_params" in fsdp_kwargs:
        raise QATError("fully_shard_prepared sets ignored_params itself (the quantizers' parameters)")
    ignored = set(quantizer_parameters(model))
    for unit in tied_units([m for m in model.modules() if isinstance(m, QuantizedLayer)]):
        fully_shard(unit if len(unit) > 1 else unit[0], ignored_params=ignored, **fsdp_kwargs)
    fully_shard(model, ignored_params=ignored, **fsdp_kwargs)
    return keep_ranks_in_step(model)


def tied_units(modules: list[nn.Module]) -> list[list[nn.Module]]:
    """``modules`` grouped so that modules sharing a parameter (a language model's embedding and its
    tied head) are in one group, in first-seen order: FSDP2 needs them in one ``fully_shard`` unit."""
    groups: list[list[nn.Module]] = []
    owner: dict[int, list[nn.Module]] = {}  # a parameter's id → its group
    for module in modules:
        found = [owner[id(p)] for p in module.parameters() if id(p) in owner]
        group = found[0] if found else []
        for other in found[1:]:  # a module that ties two groups merges them
            if other is not group:
                group.extend(other)
                groups.remove(other)
        if not found:
            groups.append(group)
        group.append(module)
        for member in group:
            for p in member.parameters():
                owner[id(p)] = group
    return groups


def check_sharding(model: nn.Module) -> None:
    """Refuse tensor parallelism: a quantized layer whose weight is still a ``DTensor`` with its
    ``fully_shard`` unit gathered is split across ranks inside its forward too, where a per-tensor,
    per-channel or per-group range would be taken over a part of the weight. A model of plain
    tensors passes at no cost; a sharded one has each unit gathered once (collective)."""
    if not dist.is_available():
        return
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return
    split = [name for name, layer in quantized_layers(model) if isinstance(layer.weight, DTensor)]  # the loop runs to its end on every rank
    if split:
        raise QATError(f"layer `{split[0]}` is tensor-parallel (its weight stays split across ranks in its forward): QAT "
                       "does not support tensor parallelism. Shard with FSDP2 only (ModelParallelStrategy(data_parallel_size=N, "
                       "tensor_parallel_size=1)), or leave the layer out of the recipe (skip)")


def _is_fsdp_unit(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` (never, where torch has no ``torch.distributed``)."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or to any module in it."""
    return any(_is_fsdp_unit(m) for m in model.modules())


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLayer]]:
    """Every quantized layer of ``model`` with its name, its parameters whole while it is yielded.

    For what reads weights outside a forward pass (per-layer summaries and statistics): under
    FSDP2 they are shards there, so the ``fully_shard`` unit that holds each layer is all-gathered
    while its layers are yielded, one unit at a time (never the whole model at once). That is
    collective: on a sharded model every rank must run the loop to its end. On any other model it
    is ``named_modules`` filtered to quantized layers.
    """
    owners: dict[str, nn.Module] = {}  # a module's name → the nearest fully_shard unit at or above it
    current: nn.Module | None = None
    try:
        for name, module in model.named_modules():
            parent = owners.get(name.rpartition(".")[0]) if name else None
            owners[name] = module if _is_fsdp_unit(module) else parent
            if not isinstance(module, QuantizedLayer):
                continue
            if owners[name] is not current:
                if current is not None:
                    current.reshard()
                current = owners[name]
                if current is not None:
                    current.unshard()
            yield name, module
    finally:
        if current is not None:
            current.reshard()
