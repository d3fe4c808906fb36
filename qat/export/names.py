"""Stable tensor names: every quantized tensor in the exported graph is named after its quantizer.

The dynamo exporter names values after the traced FX nodes (``val_31``, ``fake_quantize_4``),
which change whenever the model or torch changes. The calibration metadata, the AIMET and
TensorRT files and a device runtime need names that stay put, so this pass renames, for a
quantizer ``conv1.input_quantizer`` (prefix ``conv1.input``):

=======================  ===============================================================
``conv1.input``          the float tensor that is quantized (activations; not a graph input)
``conv1.input_quantized``  the integer tensor (QuantizeLinear output, or the weight initializer)
``conv1.input_scale``     scale initializer (absent for dynamic per-token scales)
``conv1.input_zero_point``  zero-point initializer
``conv1.input_dequantized``  the DequantizeLinear output
=======================  ===============================================================

A weight's prefix is the parameter's name (``conv1.weight``), so its codes are
``conv1.weight_quantized``. The quantizer of each QuantizeLinear/DequantizeLinear is the ``name``
argument of the ``qat::fake_quantize`` op it was lowered from (:attr:`Quantizer.export_name
<qat.core.quantizer.Quantizer.export_name>`), which the lowering records in the node's
:data:`QUANTIZER_METADATA`.
Identical quantizations of one tensor (q/k/v projections reading the same hidden state) are
merged by the exporter; the merged tensor keeps the first quantizer's name and
:func:`layer_inputs` maps every layer to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qat.errors import QATError

QUANTIZER_METADATA = "qat.quantizer"
"""Node metadata key holding the module path of the quantizer a QuantizeLinear/DequantizeLinear
lowers (:func:`qat.export.qdq.fake_quantize_to_qdq`); :func:`qat.export_onnx` clears it before saving."""


@dataclass
class QuantizedTensor:
    """One quantizer's tensors in the exported graph (names after :func:`name_quantized_tensors`)."""

    quantizer: str
    """Module path of the :class:`~qat.core.quantizer.Quantizer` (``conv1.weight_quantizer``)."""
    dequantize: ir.Node
    """The DequantizeLinear; in an *ort* artifact's quantized embedding, the GatherBlockQuantized
    that replaced it (:func:`qat.export.ort_layout.gather_block_quantized`)."""
    quantize: ir.Node | None
    """None for a weight whose QuantizeLinear was evaluated into an initializer."""

    @property
    def prefix(self) -> str:
        return self.quantizer.removesuffix("_quantizer")

    @property
    def layer(self) -> str:
        return self.quantizer.rpartition(".")[0]

    @property
    def quantized(self) -> ir.Value:
        return self.dequantize.inputs[0]

    @property
    def dequantized(self) -> ir.Value:
        return self.dequantize.outputs[0]

    @property
    def float_value(self) -> ir.Value | None:
        """The tensor being quantized, before the Max/Min clip that narrow ranges (2-3 bits) add."""
        if self.quantize is None:
            return None
        value = self.quantize.inputs[0]
        own = self.quantize.metadata_props.get("namespace")
        while (producer := value.producer()) is not None and producer.op_type in ("Min", "Max") \
                and producer.metadata_props.get("namespace") == own:
            value = producer.inputs[0]
        return value

    @property
    def _scale_input(self) -> int:
        """Where the scale is among the dequantizing node's inputs: ``DequantizeLinear(x, scale,
        zero_point)``, or ``GatherBlockQuantized(data, indices, scales, zero_points)`` (an *ort*
        artifact's embedding, :func:`qat.export.ort_layout.gather_block_quantized`)."""
        return 2 if self.dequantize.op_type == "GatherBlockQuantized" else 1

    @property
    def scale(self) -> ir.Value:
        return self.dequantize.inputs[self._scale_input]

    @property
    def zero_point(self) -> ir.Value | None:
        index = self._scale_input + 1
        return self.dequantize.inputs[index] if len(self.dequantize.inputs) > index else None


def node_quantizer(node: ir.Node) -> str | None:
    """The module path of the quantizer that emitted ``node`` (:data:`QUANTIZER_METADATA`); None for
    a node no fake quantization emitted.

    Raises:
        QATError: the fake quantization had no quantizer name: it was not called by a
            :class:`~qat.core.quantizer.Quantizer` that the exporter named.
    """
    name = node.metadata_props.get(QUANTIZER_METADATA)
    if name == "":
        module = _innermost_module(node.metadata_props.get("namespace", ""))
        raise QATError(f"a fake quantization{f' in `{module}`' if module else ''} reached the ONNX export without a quantizer "
                       "name: only a Quantizer submodule of the exported model is named (Quantizer.export_name); call fake "
                       "quantization through one")
    return name


def _innermost_module(namespace: str) -> str:
    """The class name of the innermost module in a node's ``namespace`` metadata
    (``": Model/conv1: torch.nn.modules.conv.Conv2d/fake_quantize: qat.fake_quantize.default"`` → ``Conv2d``)."""
    classes = [scope.rpartition(": ")[2] for scope in namespace.split("/")[:-1]]
    return classes[-1].rpartition(".")[2] if classes else ""


def find_quantized_tensors(graph: ir.Graph) -> list[QuantizedTensor]:
    """Every DequantizeLinear emitted by a quantizer, with its QuantizeLinear when one runs."""
    found = []
    for node in graph:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        quantizer = node_quantizer(node)
        if quantizer is None:
            continue
        producer = node.inputs[0].producer()
        quantize = producer if producer is not None and producer.op_type == "QuantizeLinear" else None
        found.append(QuantizedTensor(quantizer, node, quantize))
    return found


def _own(graph: ir.Graph, value: ir.Value | None, name: str, owner: set[ir.Node]) -> None:
    """Give the initializer ``value`` the name ``name`` for the nodes in ``owner``: renamed when
    nobody else reads it, otherwise copied (the exporter shares equal constants between layers)."""
    if value is None or value.const_value is None or value.name == name:
        return
    if all(user in owner for user, _ in value.uses()):
        value.name = name
        return
    copy = ir.Value(name=name, shape=value.shape, type=value.type, const_value=ir.tensor(value.const_value.numpy(), name=name))
    graph.register_initializer(copy)
    for user, index in list(value.uses()):
        if user in owner:
            user.replace_input_with(index, copy)


def name_quantized_tensors(model: ir.Model) -> list[QuantizedTensor]:
    """Rename every quantizer's tensors as the module docstring says; returns them, in graph order."""
    graph = model.graph
    protected = {v.name for v in (*graph.inputs, *graph.outputs)}
    found = find_quantized_tensors(graph)
    taken: set[str] = set()
    for tensor in found:
        p = tensor.prefix
        if p + "_quantized" in taken:  # a second node of the same quantizer: leave it as is
            continue
        taken.add(p + "_quantized")
        owner = {tensor.dequantize} | ({tensor.quantize} if tensor.quantize is not None else set())
        _own(graph, tensor.scale, f"{p}_scale", owner)
        _own(graph, tensor.zero_point, f"{p}_zero_point", owner)
        if tensor.quantize is None:
            _own(graph, tensor.quantized, f"{p}_quantized", owner)
        else:
            tensor.quantized.name = f"{p}_quantized"
            source = tensor.float_value
            if source is not None and source.name not in protected and source.name not in taken:
                source.name = p
                taken.add(p)
        if tensor.dequantized.name not in protected:
            tensor.dequantized.name = f"{p}_dequantized"
    return found


def consumers_through(value: ir.Value, passthrough: tuple[str, ...] = ("Transpose", "Reshape", "Cast")) -> list[ir.Node]:
    """The nodes that compute with ``value``, looking through layout-only nodes."""
    result = []
    for user, _ in value.uses():
        if user.op_type in passthrough:
            result.extend(consumers_through(user.outputs[0], passthrough))
        else:
            result.append(user)
    return result


def layer_inputs(tensors: list[QuantizedTensor]) -> dict[str, QuantizedTensor]:
    """For each layer with a weight in the graph, the activation tensor its operator reads.

    Found through the graph (the other input of the operator that reads the weight), so a layer
    whose input quantization was merged with another layer's still gets the merged tensor.
    """
    by_dequantized = {t.dequantized.name: t for t in tensors if t.quantize is not None}
    result = {}
    for tensor in tensors:
        if tensor.quantize is not None:
            continue
        for op in consumers_through(tensor.dequantized):
            for value in op.inputs:
                if value is not None and value.name in by_dequantized:
                    result[tensor.layer] = by_dequantized[value.name]
    return result


def rename_outputs(model: ir.Model, names: list[str] | None) -> None:
    """Name the graph outputs ``names``, or ``output`` / ``output_0``, ``output_1``, … by default."""
    outputs = model.graph.outputs
    if names is None:
        names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    if len(names) != len(outputs):
        raise QATError(f"output_names has {len(names)} names for {len(outputs)} outputs")
    for value, name in zip(outputs, names, strict=True):
        value.name = name
