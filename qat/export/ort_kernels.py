"""Which ONNX Runtime kernel each quantized layer runs on, read from ORT's optimized graph.

ONNX Runtime rewrites ``DequantizeLinear → Conv → QuantizeLinear`` into QLinearConv, blocked
4-bit ``DequantizeLinear → MatMul`` into MatMulNBits, and so on, when the pattern and the
types allow; otherwise it dequantizes the weight and runs the float operator, silently. This
module asks ORT to save the graph it actually runs (``SessionOptions.optimized_model_filepath``)
and follows each layer's integer weight to the node that consumes it:

- an integer kernel (QLinearConv, QGemm, MatMulNBits, MatMulIntegerToFloat, …) reads the codes
  directly: the layer runs in integers;
- a DequantizeLinear reads them: the layer runs in float (the kernel is reported as
  ``float <Op>``, the operator after the DequantizeLinear).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort


def runs_in_float(kernel: str) -> bool:
    """True for a kernel as reported here for a layer that dequantizes its weight (``float Conv``)."""
    return kernel.startswith("float")


def float_fallback(layers: Mapping[str, str]) -> list[str]:
    """The layers of a ``layer → kernel`` report that run in float."""
    return [layer for layer, kernel in layers.items() if runs_in_float(kernel)]


def integer_share(layers: Mapping[str, str]) -> float:
    """The share of the layers of a ``layer → kernel`` report that run on an integer kernel (a folded
    layer, whose weight ORT computed away, counts as neither; 0 without layers)."""
    counted = [kernel for kernel in layers.values() if kernel != "folded"]
    return sum(not runs_in_float(kernel) for kernel in counted) / len(counted) if counted else 0.0


@dataclass(frozen=True)
class KernelReport:
    """Per layer, the kernel ONNX Runtime runs it with (``float Conv`` when it fell back to float)."""

    layers: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    """How many nodes of each operator type the optimized graph has."""

    @property
    def float_fallback(self) -> list[str]:
        return float_fallback(self.layers)


def session_options(config: dict[str, str] | None = None) -> ort.SessionOptions:
    """CPU session options with every graph optimization on and ``config`` entries applied."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the optimized-graph dump warns that it is hardware specific
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def optimized_graph(path: Path, config: dict[str, str] | None = None) -> onnx.GraphProto:
    """The graph ONNX Runtime (CPU) runs for the model at ``path``."""
    with tempfile.TemporaryDirectory() as folder:
        options = session_options(config)
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath, load_external_data=False).graph


_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast")


def kernel_report(path: Path, weights: dict[str, str], config: dict[str, str] | None = None) -> KernelReport:
    """The kernel of each layer, given ``weights``: layer name → name of its integer weight initializer.

    A fused kernel may repack the weight into an initializer of its own named after it
    (MatMulNBits reads ``<weight>_T``): such readers count as reading the weight. ORT may also
    give a rewritten weight a name of its own (a transpose folded into the codes reads
    ``QuantizeLinear_token_…``); the weight's scale (``<prefix>_scale`` for ``<prefix>_quantized``)
    keeps its name, so its readers count then. A float operator is named past layout-only nodes
    (``float Gemm``, not ``float Transpose``). A weight that nobody reads any more was folded away
    by ORT (``folded``).
    """
    graph = optimized_graph(path, config)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def computing(value: str) -> str | None:
        """The first operator reading ``value`` that is not a layout-only node."""
        for user in readers.get(value, []):
            if user.op_type not in _LAYOUT_OPS:
                return user.op_type
            found = computing(user.output[0])
            if found is not None:
                return found
        return None

    layers = {}
    for layer, weight in weights.items():
        nodes = [n for name, users in readers.items() if name == weight or name.startswith(weight + "_") for n in users]
        if not nodes:
            nodes = readers.get(weight.removesuffix("_quantized") + "_scale", [])
        if not nodes:
            layers[layer] = "folded"
            continue
        node = nodes[0]
        if node.op_type == "DequantizeLinear":
            after = computing(node.output[0])
            layers[layer] = f"float {after}" if after else "float"
        else:
            layers[layer] = node.op_type
    return KernelReport(layers, dict(Counter(node.op_type for node in graph.node)))
