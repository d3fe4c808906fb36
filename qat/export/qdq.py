"""Lowering of ``torch.ops.qat.fake_quantize`` to ONNX QuantizeLinear → DequantizeLinear (opset 21).

Inside :func:`qat.exporting`, pass :data:`CUSTOM_TRANSLATION_TABLE` to ``torch.onnx.export(..., dynamo=True,
opset_version=OPSET, custom_translation_table=...)``. The op's integer range picks the ONNX integer type: the
smallest of int4/uint4, int8/uint8, int16/uint16 that holds it. A range narrower than that
type (2 or 3 bits, narrow range) is applied first as ``Min(Max(x, (qmin - z)·s), (qmax - z)·s)``,
which gives the same codes (the numeric contract in :mod:`qat.core.fake_quant`).
The scale and zero-point guards of :func:`~qat.core.fake_quant.fake_quantize_math` are emitted too
(``Max(s, MIN_SCALE)``, ``Clip(Round(z))``); on constant parameters the exporter's optimizer
folds them away.

An int32 range (a bias, :mod:`qat.core.bias`) has no QuantizeLinear (opset 21 quantizes to at most
16 bits): its codes are ``Cast(Clip(Round(x / s)), int32)``, the same float32 arithmetic, read by a
DequantizeLinear without a zero point (int32 codes have none). On a constant bias the optimizer
folds the codes into an int32 initializer.

Example:
    >>> import torch, qat
    >>> from qat.export.qdq import CUSTOM_TRANSLATION_TABLE, OPSET
    >>> model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(8, 4)), {"weight": {"bits": 4}})
    >>> _ = model(torch.randn(2, 8))  # observe ranges
    >>> qat.set_observers(model, False)
    >>> with qat.exporting():
    ...     program = torch.onnx.export(model.eval(), (torch.randn(2, 8),), dynamo=True, verbose=False,
    ...                                 opset_version=OPSET, custom_translation_table=CUSTOM_TRANSLATION_TABLE)
    >>> sorted({n.op_type for n in program.model_proto.graph.node})
    ['DequantizeLinear', 'Gemm', 'QuantizeLinear']
"""

from __future__ import annotations

import torch
from onnx import TensorProto
from onnxscript import opset21 as op

from qat.core.fake_quant import scale_floor
from qat.core.spec import integer_range
from qat.errors import QATError
from qat.export.names import QUANTIZER_METADATA

OPSET = 21

_CONTAINERS = tuple((*integer_range(bits, signed), dtype) for bits, signed, dtype in (
    (4, True, TensorProto.INT4),
    (4, False, TensorProto.UINT4),
    (8, True, TensorProto.INT8),
    (8, False, TensorProto.UINT8),
    (16, True, TensorProto.INT16),
    (16, False, TensorProto.UINT16),
    (32, True, TensorProto.INT32),
))
"""``(type_min, type_max, onnx_dtype)`` of the ONNX integer types, smallest first."""


def onnx_container(qmin: int, qmax: int) -> tuple[int, int, int]:
    """``(onnx_dtype, type_min, type_max)`` of the smallest ONNX integer type holding ``[qmin, qmax]``."""
    for low, high, dtype in _CONTAINERS:
        if low <= qmin and qmax <= high:
            return dtype, low, high
    raise QATError(f"no ONNX integer type holds the code range [{qmin}, {qmax}]")


def fake_quantize_to_qdq(x, scale, zero_point, qmin: int, qmax: int, axis: int, block_size: int, name: str = ""):
    """onnxscript translation of ``qat::fake_quantize`` (see the module docstring). ``name`` (the
    quantizer's module path) is recorded on the QuantizeLinear and DequantizeLinear as node metadata
    (:data:`qat.export.names.QUANTIZER_METADATA`), not emitted: the exporter names the graph's
    tensors after it and clears it before saving."""
    dtype, type_min, type_max = onnx_container(qmin, qmax)
    s = op.Max(scale, op.Constant(value_float=scale_floor(qmin, qmax)))
    if dtype == TensorProto.INT32:
        codes = op.Clip(op.Round(op.Div(x, s)), op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax)))
        y = op.DequantizeLinear(op.Cast(codes, to=dtype), s, axis=axis)
        y.producer().metadata_props[QUANTIZER_METADATA] = name
        return y
    z_float = op.Clip(op.Round(zero_point), op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax)))
    z = op.Cast(z_float, to=dtype)
    if (qmin, qmax) != (type_min, type_max):
        # The bounds (qmin - z)·s and (qmax - z)·s in x's full shape, for any layout: DequantizeLinear
        # of a tensor of constant codes with the same scale, zero point, axis and block size.
        def bound(code: int):
            codes = op.Expand(op.Constant(value_int=code), op.Shape(x))
            return op.DequantizeLinear(op.Cast(codes, to=dtype), s, z, axis=axis, block_size=block_size)

        x = op.Min(op.Max(x, bound(qmin)), bound(qmax))
    # no output_dtype: the zero point's type says it, and ONNX Runtime's S8→U8 rewrite on x86
    # changes the zero point but not the attribute, then rejects its own graph (seen with ORT 1.32)
    q = op.QuantizeLinear(x, s, z, axis=axis, block_size=block_size)
    y = op.DequantizeLinear(q, s, z, axis=axis, block_size=block_size)
    for value in (q, y):
        value.producer().metadata_props[QUANTIZER_METADATA] = name
    return y


CUSTOM_TRANSLATION_TABLE = {torch.ops.qat.fake_quantize.default: fake_quantize_to_qdq}
"""``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``."""
