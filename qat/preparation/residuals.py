"""Quantize residual connections and the other operators between layers, so that a runtime can
keep them in integers.

A recipe quantizes the *inputs* of layers with weights. In a residual network that leaves the
additions float: ``out = relu(bn2(conv2(y)) + x)`` reads the float output of ``conv2`` and the
float block input ``x`` (whose quantized copy only ``conv1`` reads). ONNX Runtime then runs
``conv2`` and the addition in float, with a dequantize in front of each. The same holds for the
operators of edge networks: a MobileNet's squeeze-excite multiplies two float tensors, and a
convolution whose output goes to a Hardswish has no quantized output to fuse with.

With ``residuals: true`` (additions) or ``operators: [add, mul, concat, pool, activation]`` in
the recipe, :func:`qat.prepare` traces the example inputs once and, for every such operator
(:data:`OPERATOR_FUNCTIONS`) whose operands are activations, quantizes its operands and its
result where they are *produced*, so that every reader sees the same integers:

- each operand: the output of the layer that computed it (``conv2``, with its folded
  BatchNorm) or of the module that returned it (the previous block, a pooling layer, an
  activation module);
- the result, after any ReLU applied to it (the block's output).

A quantized layer whose input is one of these tensors gives its own input quantizer up: the
producer's quantizer, with the spec that layer's input had, takes its place. The exported graph
then reads ``Q → DQ → {Conv, Add}``, which ONNX Runtime fuses into QLinearConv and QLinearAdd
(QLinearMul, QLinearConcat, QLinearAveragePool, QLinearSigmoid likewise). An activation without
an integer kernel (SiLU, GELU) runs in float between the two quantized tensors, and the
convolution in front of it on an integer kernel; Hardswish and Hardsigmoid modules compute their
gate on a fixed grid (:mod:`qat.modules.activation`), which ORT runs as QLinearAdd and QLinearMul.

The producer of a tensor is the innermost module, called once per forward and not a container
(``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``), that returned it before anything read
it (so quantizing that module's output changes every reader alike). An
operator with an operand no such module returns (a shared ``nn.ReLU`` called twice, a tensor
computed inline) keeps that operand float.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from qat.core.quantizer import Quantizer
from qat.core.spec import QuantSpec
from qat.errors import QATError
from qat.preparation.bn_fold import trace_example

OUTPUT_QUANTIZER = "output_quantizer"

OPERATOR_FUNCTIONS: dict[str, frozenset[Any]] = {
    "add": frozenset({torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__}),
    "mul": frozenset({torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__}),
    "concat": frozenset({torch.cat, torch.concat, torch.concatenate}),
    "pool": frozenset({F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                       F.adaptive_avg_pool3d}),
    "activation": frozenset({F.hardswish, F.hardsigmoid, torch.sigmoid, Tensor.sigmoid, F.sigmoid, F.silu, F.gelu,
                             F.leaky_relu}),
}
"""The torch functions each recipe ``operators`` kind stands for (what a ``TorchFunctionMode`` sees
when ``nn.Hardswish``, ``torch.cat``, ``x * gate``… run)."""

_BINARY = ("add", "mul")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
"""Modules that run their children in order (DenseNet's block is an ``nn.ModuleDict``): an output
quantizer child would become one of the steps, so their outputs are quantized inside, or not at all."""
_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}


@dataclass(eq=False)
class _Value:
    """One tensor value at one point of the forward (an in-place op makes a new value)."""

    producers: list[str] = field(default_factory=list)
    """Modules that returned this value before anything read it, innermost first."""
    readers: list[str] = field(default_factory=list)
    """Quantizable layers whose input it is."""
    uses: int = 0
    relu: _Value | None = None
    """The value a ReLU made of this one (followed when that ReLU is its only use)."""


class _Dataflow(TorchFunctionMode):
    """Follows tensor values through torch calls: which call made each, which reads it."""

    def __init__(self, operators: Collection[str]) -> None:
        super().__init__()
        self.kinds = {func: kind for kind in operators for func in OPERATOR_FUNCTIONS[kind]}
        self.values: dict[int, _Value] = {}
        self.alive: list[Tensor] = []  # keeps ids from being reused during the trace
        self.operators: list[tuple[list[_Value], _Value]] = []
        """Each operator call seen: its operand values and its result."""

    def value(self, tensor: Tensor) -> _Value:
        if id(tensor) not in self.values:
            self.values[id(tensor)] = _Value()
            self.alive.append(tensor)
        return self.values[id(tensor)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = [self.value(leaf) for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]
        out = func(*args, **kwargs)
        for value in read:
            value.uses += 1
        made = []
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self.values[id(leaf)] = _Value()
                self.alive.append(leaf)
                made.append(self.values[id(leaf)])
        kind = self.kinds.get(func)
        if kind is not None and len(made) == 1 and _activation_operands(kind, args):
            self.operators.append((read, made[0]))
        if func in _RELUS and len(read) == 1 and len(made) == 1:
            read[0].relu = made[0]
        return out


def _activation_operands(kind: str, args: tuple[Any, ...]) -> bool:
    """True when a call of a ``kind`` operator reads float activations only: two same-shaped
    tensors for an addition (two broadcastable ones for a multiplication), a list of tensors for
    a concatenation, one tensor for a pool or an activation."""
    if kind == "concat":
        tensors = list(args[0]) if args and isinstance(args[0], (list, tuple)) else []
    else:
        tensors = list(args[:2]) if kind in _BINARY else list(args[:1])
        if kind in _BINARY and (len(tensors) < 2 or any(not isinstance(t, Tensor) for t in tensors)):
            return False
        if kind == "add" and tensors[0].shape != tensors[1].shape:
            return False
    return bool(tensors) and all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors)


@dataclass
class ResidualPlan:
    """Where :func:`qat.prepare` puts output quantizers: module name → the quantized layers
    whose input that output is (their input quantizers move to the module's output)."""

    outputs: dict[str, list[str]] = field(default_factory=dict)


def find_residuals(model: nn.Module, example_inputs: Any, readers: Mapping[str, QuantSpec | None],
                   fold_pairs: Mapping[str, str], operators: Collection[str] = ("add",),
                   on_grid: tuple[type[nn.Module], ...] = ()) -> ResidualPlan:
    """Trace ``example_inputs`` through the float ``model`` and place the output quantizers around
    every call of the ``operators`` kinds (:data:`OPERATOR_FUNCTIONS`).

    Args:
        readers: the layers that will be quantized → their input spec (None: no input quantizer).
        fold_pairs: folded convolution → BatchNorm: a folded BatchNorm's output is quantized at
            its convolution (the BatchNorm is gone after folding).
        operators: the kinds of operator (keys of :data:`OPERATOR_FUNCTIONS`) to quantize around.
        on_grid: module types whose output is already on a fixed grid once prepared (a gated
            Hardsigmoid): their outputs get no quantizer.
    """
    flow = _Dataflow(operators)
    calls: Counter[str] = Counter()
    modules = dict(model.named_modules())

    def after(name: str):
        def hook(module, args, output):
            calls[name] += 1
            if isinstance(output, Tensor) and id(output) in flow.values and flow.values[id(output)].uses == 0:
                flow.values[id(output)].producers.append(name)
        return hook

    def before(name: str):
        def hook(module, args):
            if args and isinstance(args[0], Tensor):
                flow.value(args[0]).readers.append(name)
        return hook

    handles = [m.register_forward_hook(after(n)) for n, m in modules.items() if n]
    handles += [modules[n].register_forward_pre_hook(before(n)) for n, spec in readers.items() if spec is not None]
    trace_example(model, example_inputs, handles, flow)

    plan = ResidualPlan()
    for operands, result in flow.operators:
        while result.relu is not None and result.uses == 1:
            result = result.relu
        for value in (*operands, result):
            producer = next((p for p in value.producers if calls[p] == 1 and not isinstance(modules[p], _CONTAINERS)), None)
            if producer is None or isinstance(modules[producer], on_grid):
                continue
            specs = {readers[r] for r in value.readers}
            if len(specs) > 1 or not all(s.per_tensor_static for s in specs):
                continue  # readers quantize it differently: leave it to them
            plan.outputs.setdefault(folded_name(producer, fold_pairs), list(value.readers))
    return plan


def folded_name(name: str, fold_pairs: Mapping[str, str]) -> str:
    """Where the module ``name`` of the float model is once ``fold_pairs`` (convolution →
    BatchNorm) are folded: a folded BatchNorm's output is its convolution's, and a module inside
    it (timm's ``BatchNormAct2d`` activation) moves with it under the convolution's ``bn``."""
    for conv, bn in fold_pairs.items():
        if name == bn:
            return conv
        if name.startswith(bn + "."):
            return f"{conv}.bn.{name[len(bn) + 1:]}"
    return name


def quantize_output(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    """Forward hook: the module's output through its ``output_quantizer``."""
    return getattr(module, OUTPUT_QUANTIZER)(output)


def attach_output_quantizer(module: nn.Module, spec: QuantSpec) -> None:
    """Give ``module`` an ``output_quantizer`` child and a forward hook that applies it."""
    if getattr(module, OUTPUT_QUANTIZER, None) is not None:
        raise QATError(f"{type(module).__name__} already has an {OUTPUT_QUANTIZER}")
    device = next((t.device for t in [*module.parameters(), *module.buffers()]), None)
    module.add_module(OUTPUT_QUANTIZER, Quantizer(spec, role="activation").to(device))
    module.register_forward_hook(quantize_output)


def detach_output_quantizer(module: nn.Module) -> None:
    """Undo :func:`attach_output_quantizer` (what :func:`qat.strip` does to a copy)."""
    for key, hook in list(module._forward_hooks.items()):
        if hook is quantize_output:
            del module._forward_hooks[key]
    if OUTPUT_QUANTIZER in module._modules:
        del module._modules[OUTPUT_QUANTIZER]
