"""Find the BatchNorm layers that can be folded into the convolution before them.

Module order says nothing about dataflow, so pairs are found by running the example inputs
through the model once (eval mode, no grad, so no BatchNorm statistic moves) and watching the
tensors: a BatchNorm folds into a convolution when

- the convolution (``nn.Conv1d/2d/3d``) and the BatchNorm (``nn.BatchNorm1d/2d/3d``, or timm's
  ``BatchNormAct2d``, with running statistics) have matching dimensionality and channel count,
- each is called exactly once,
- the BatchNorm's input *is* the convolution's output, and nothing else uses that output
  (folding would change what another consumer sees).

Uses are counted with a ``TorchFunctionMode``: every torch function that returns a tensor and
takes the convolution's output as an argument is one use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from qat.errors import QATError
from qat.modules.conv import FOLDABLE, bn_tail


def is_foldable_bn(module: nn.Module) -> bool:
    """True for the BatchNorm layers :func:`find_conv_bn_pairs` considers."""
    return bn_tail(module) is not None


@dataclass
class FoldPlan:
    """``pairs``: convolution name → BatchNorm name; ``unfolded``: BatchNorm name → why not."""

    pairs: dict[str, str] = field(default_factory=dict)
    unfolded: dict[str, str] = field(default_factory=dict)


def run_example(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on example inputs: a tensor, a tuple/list of positional arguments, or a
    mapping of keyword arguments (Hugging Face style)."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def trace_example(model: nn.Module, example_inputs: Any, handles: list[RemovableHandle], mode: TorchFunctionMode) -> None:
    """Run ``example_inputs`` through ``model`` once, in eval mode under ``no_grad`` (no
    BatchNorm statistic moves) inside ``mode``; then remove the ``handles`` (the caller's hooks)
    and put every module back in the training mode it had."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), mode:
            run_example(model, example_inputs)
    except Exception as err:
        raise QATError(f"the example inputs do not run through the model ({type(err).__name__}: {err}); "
                       "pass inputs the model's forward accepts, or prepare without example_inputs") from err
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


class _UseCounter(TorchFunctionMode):
    """Counts, for each watched tensor, the torch calls that consume it and produce a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, Tensor] = {}  # id → tensor, kept alive so ids are not reused
        self.uses: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(leaf, Tensor) for leaf in tree_leaves(out)):
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, Tensor) and id(leaf) in self.watched:
                    self.uses[id(leaf)] += 1
        return out


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any) -> FoldPlan:
    """Trace ``example_inputs`` through ``model`` and return the foldable conv → BN pairs."""
    convs = {name: m for name, m in model.named_modules() if type(m) in FOLDABLE}
    bns = {name: m for name, m in model.named_modules() if is_foldable_bn(m)}
    plan = FoldPlan()
    if not bns:
        return plan
    counter = _UseCounter()
    producer: dict[int, str] = {}  # id(conv output) → conv name
    calls: Counter[str] = Counter()
    bn_input: dict[str, int] = {}

    def conv_hook(name: str):
        def hook(module, args, output):
            calls[name] += 1
            counter.watched[id(output)] = output
            producer[id(output)] = name

        return hook

    def bn_hook(name: str):
        def hook(module, args):
            calls[name] += 1
            bn_input[name] = id(args[0])

        return hook

    handles = [m.register_forward_hook(conv_hook(n)) for n, m in convs.items()]
    handles += [m.register_forward_pre_hook(bn_hook(n)) for n, m in bns.items()]
    trace_example(model, example_inputs, handles, counter)

    for bn_name, bn in bns.items():
        conv_name = producer.get(bn_input.get(bn_name, -1))
        conv = convs.get(conv_name)
        if calls[bn_name] == 0:
            reason = "not called on the example inputs"
        elif not bn.track_running_stats or bn.running_var is None:
            reason = "has no running statistics to fold"
        elif conv is None:
            reason = "its input is not the output of a Conv1d/2d/3d"
        elif not isinstance(bn, FOLDABLE[type(conv)]) or conv.out_channels != bn.num_features:
            reason = f"does not match `{conv_name}` ({type(conv).__name__}, {conv.out_channels} channels)"
        elif calls[bn_name] > 1 or calls[conv_name] > 1:
            reason = f"it or `{conv_name}` is called more than once per forward"
        elif counter.uses[bn_input[bn_name]] > 1:
            reason = f"the output of `{conv_name}` is also used elsewhere"
        else:
            plan.pairs[conv_name] = bn_name
            continue
        plan.unfolded[bn_name] = f"BatchNorm not folded: {reason}"
    return plan
