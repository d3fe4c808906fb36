"""The oracle of the numeric contract: ONNX DequantizeLinear(QuantizeLinear(x)) evaluated by
onnx.reference.ReferenceEvaluator, written here with onnx.helper, independently of qat's code.

Ranges narrower than their ONNX integer type (2/3 bits, narrow range) are clipped first to the
dequantized values of the end codes, as the contract in qat.core.fake_quant states."""

from __future__ import annotations

from functools import cache

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

CONTAINERS = (
    (-8, 7, TensorProto.INT4, ml_dtypes.int4),
    (0, 15, TensorProto.UINT4, ml_dtypes.uint4),
    (-128, 127, TensorProto.INT8, np.int8),
    (0, 255, TensorProto.UINT8, np.uint8),
    (-32768, 32767, TensorProto.INT16, np.int16),
    (0, 65535, TensorProto.UINT16, np.uint16),
)
EPS = np.finfo(np.float32).eps


def container(qmin: int, qmax: int):
    return next(c for c in CONTAINERS if c[0] <= qmin and qmax <= c[1])


@cache
def _evaluator(onnx_type: int, axis: int | None, block_size: int, clipped: bool) -> ReferenceEvaluator:
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size:
        attrs["block_size"] = block_size
    nodes = []
    x = "x"
    if clipped:
        nodes += [
            helper.make_node("DequantizeLinear", ["lo_codes", "s", "z"], ["lo"], **attrs),
            helper.make_node("DequantizeLinear", ["hi_codes", "s", "z"], ["hi"], **attrs),
            helper.make_node("Max", ["x", "lo"], ["x_lo"]),
            helper.make_node("Min", ["x_lo", "hi"], ["x_clipped"]),
        ]
        x = "x_clipped"
    nodes += [
        helper.make_node("QuantizeLinear", [x, "s", "z"], ["q"], output_dtype=onnx_type, **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("z", onnx_type, None),
    ]
    if clipped:
        inputs += [helper.make_tensor_value_info(n, onnx_type, None) for n in ("lo_codes", "hi_codes")]
    graph = helper.make_graph(nodes, "qdq", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def onnx_fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int,
                    axis: int | None = None, block_size: int = 0) -> np.ndarray:
    """DQ(Q(x)) in ONNX, with the contract's scale guard (scale >= float32 eps).

    ``axis`` None: per tensor; with ``block_size`` 0: per axis; otherwise blocked."""
    low, high, onnx_type, np_type = container(qmin, qmax)
    clipped = (qmin, qmax) != (low, high)
    feeds = {
        "x": np.asarray(x, np.float32),
        "s": np.maximum(np.asarray(scale, np.float32), EPS),
        "z": np.asarray(zero_point).astype(np.int64).astype(np_type),
    }
    if clipped:
        feeds["lo_codes"] = np.full(x.shape, qmin).astype(np_type)
        feeds["hi_codes"] = np.full(x.shape, qmax).astype(np_type)
    with np.errstate(invalid="ignore"):  # |x / s| >= 2**31 overflows the reference's int32 cast (see the tests)
        return _evaluator(onnx_type, axis, block_size, clipped).run(None, feeds)[0]
