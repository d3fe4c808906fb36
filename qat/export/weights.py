"""Weight lowering: ``QuantizeLinear(constant W) → DequantizeLinear`` becomes ``integer W → DequantizeLinear``.

The dynamo exporter emits every fake-quantized weight as a QuantizeLinear of the float weight,
and no ONNX optimizer folds a QuantizeLinear of a constant, so without this pass the file keeps
float32 weights and quantizes them at every run. The pass evaluates each such QuantizeLinear once,
with ``onnx.reference`` (the ONNX specification's own QuantizeLinear, so the codes are by
definition what a runtime would compute), stores the codes as an initializer of the node's output
type (int4/uint4 are packed two per byte when saved), points the DequantizeLinear at it, and drops
the QuantizeLinear and the float weight.

Weights narrower than their integer type (2, 3 or 7 bits) reach the QuantizeLinear through
``Max(W, lo) → Min(·, hi)``, whose bounds are DequantizeLinear of constant codes; no optimizer
folds DequantizeLinear either, so those bounds and the Max/Min of the constant weight are
evaluated here first, the same way, before the QuantizeLinear.

Math: ``q = saturate(round_half_to_even(W / s) + z)`` per tensor, per axis or per block; the
DequantizeLinear that follows computes ``(q - z) * s``, unchanged, so the graph's output is
exactly what it was.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from qat.export.names import QUANTIZER_METADATA


def _constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def quantized_weight_name(weight: str) -> str:
    """The initializer name of a weight's integer codes: ``fc1.weight`` → ``fc1.weight_quantized``."""
    return f"{weight}_quantized"


_CLIP_OPS = ("DequantizeLinear", "Max", "Min")


def _evaluate(node: ir.Node, inputs: list[np.ndarray]) -> np.ndarray:
    evaluator = ReferenceEvaluator(ir.serde.serialize_node(node))
    feeds = {value.name: array for value, array in zip(node.inputs, inputs, strict=True)}
    (result,) = evaluator.run(None, feeds)
    return np.asarray(result)


def _register(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def lower_weights(model: ir.Model) -> list[str]:
    """Replace every QuantizeLinear whose inputs are all constants by an integer initializer.

    Returns the names of the new initializers. Only main-graph nodes are visited, in order, so
    a narrow-range clip of a constant is folded before the QuantizeLinear that reads it; the
    float weights that no other node reads are removed.
    """
    graph = model.graph
    lowered = []
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("QuantizeLinear", *_CLIP_OPS):
            continue
        inputs = [_constant(v) for v in node.inputs]
        own_dequantize = node.op_type == "DequantizeLinear" and QUANTIZER_METADATA in node.metadata_props
        if any(v is None for v in inputs) or node.inputs[0].name in lowered or own_dequantize:
            # an activation (quantized at inference), or the DequantizeLinear of a lowered weight or an int32 bias
            continue
        if node.op_type in _CLIP_OPS:
            output, folded = node.outputs[0], _evaluate(node, inputs)
            name, output.name = output.name, None  # the initializer takes the name over
            output.replace_all_uses_with(_register(graph, name, folded))
            graph.remove(node, safe=True)
            continue
        codes = _evaluate(node, inputs)
        name = quantized_weight_name(node.inputs[0].name)
        initializer = _register(graph, name, codes)
        node.outputs[0].replace_all_uses_with(initializer)
        graph.remove(node, safe=True)
        lowered.append(name)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in graph.outputs and name not in lowered:
            del graph.initializers[name]
    return lowered
