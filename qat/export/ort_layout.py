"""The *ort* artifact: the device graph's numbers laid out for ONNX Runtime's fast CPU kernels.

ONNX Runtime fuses QuantizeLinear/DequantizeLinear patterns into integer kernels only for some
layouts (docs/design/numeric-contract.md, "Export facts"). Six passes rewrite the device graph into those layouts
without changing a single weight or activation value:

- :func:`widen_small_weights`: a 4-bit (or narrower) weight read by Conv, ConvTranspose, Gemm or
  MatMul with per-tensor or per-channel scales is stored in int8/uint8 instead of int4/uint4.
  The codes and the zero point are the same integers, so ``(q - z)·s`` is unchanged; ORT has no
  int4 Conv kernel, but fuses int8 ``DQ → Conv → Q`` into QLinearConv.
- :func:`widen_small_activations`: static 4-bit activation codes go into 8-bit containers, with
  a clip to the 4-bit range in front (ORT fuses uint4 Q/DQ into kernels that reject uint4).
- :func:`matmul_nbits_layout`: a blocked 4-bit Linear weight, exported as
  ``W[N, K] → DQ(axis 1, block B) → Transpose → MatMul``, becomes
  ``Wᵀ[K, N] → DQ(axis 0, block B) → MatMul`` (the codes, scales and zero points transposed),
  which ORT rewrites into MatMulNBits when ``B`` is a power of two ≥ 16. The weight is the same
  matrix, so the product is the same. A dynamic per-token activation Q/DQ in front of such a
  MatMul is removed: MatMulNBits quantizes its input to int8 itself (per block, when the session
  sets ``session.qdq_matmulnbits_accuracy_level`` to 4, :data:`SESSION_CONFIG`), so this is the
  one rewrite that moves numbers, by less than one int8 step; verification measures it.
- :func:`gather_block_quantized`: a blocked 4-bit embedding table, exported as
  ``table → DQ(axis 1, block B) → Gather(ids)``, becomes ORT's ``GatherBlockQuantized(codes, ids,
  scales, zero points)``, which dequantizes the rows it gathers. ORT does not fuse that pattern
  itself: it dequantized the whole table on every run, most of an LLM's decode step
  (benchmarks/RESULTS.md). Same codes and scales, same numbers.
- :func:`global_average_pool`: a quantized mean over every spatial axis (an adaptive average
  pool to 1×1, which ``torch.onnx`` exports as ``ReduceMean``), ``DQ → ReduceMean → Q``, becomes
  ``DQ → GlobalAveragePool → Q``, the same mean, which ORT fuses into QLinearGlobalAveragePool
  (it has no integer ReduceMean). A squeeze-excite block's pool then stays in integers.
- :func:`integer_gates`: a hard gate (:mod:`qat.core.gate`), exported as
  ``Add(DQ(x), 3) → Q → DQ → Div(6)``, gets its constant as ``DQ(uint8 1, scale 3)`` (the same
  3.0) and its division folded into the DequantizeLinear's scale (``6/255 / 6``, in float32), so
  ORT fuses a QLinearAdd, and the Mul of a Hardswish or a squeeze-excite reads the gate straight
  from a DequantizeLinear and becomes a QLinearMul. The folded scale moves the gate's values by at
  most one float32 rounding (``c·(s/6)`` against ``(c·s)/6``); verification measures it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qat.core.fake_quant import MIN_SCALE
from qat.core.spec import integer_range
from qat.export.names import QuantizedTensor, consumers_through

SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "4"}
"""ORT session options the *ort* artifact is meant to run with (recorded in its sidecar)."""

NO_MATMUL_ADD_FUSION = {"optimization.disable_specified_optimizers": "MatMulAddFusion"}
"""ORT session options that keep a Linear on a sequence (a 3-D ``MatMul → Add``) as two nodes
instead of letting ONNX Runtime's MatMulAddFusion turn it into ``Reshape → Gemm``. Two reasons,
both seen with ORT 1.32 (:func:`session_options_for`):

- **Integer kernels.** The fusion runs before the QDQ fusions and takes the MatMul away from
  them: every Linear of a transformer with static 8-bit inputs then runs as a float Gemm on
  dequantized operands. Without it, ``DQ → MatMul`` with an 8-bit input becomes
  MatMulIntegerToFloat, and a ViT's Linears run on integer kernels, faster than the float export
  instead of slower (``benchmarks/ort_latency.py``).
- **Signed int8 activations** (either artifact): QDQ propagation copies the int8 Q/DQ pair across
  the fusion's new Reshape with ``output_dtype`` int8; the x86 S8→U8 rewrite then changes that
  pair's zero point to uint8 but not the attribute, and ORT rejects its own optimized graph
  ("output_dtype INT8 does not match y_zero_point type UINT8").

The graph computes the same numbers either way (tested on a small BERT)."""

_MATMUL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_WIDER = {ir.DataType.INT4: ir.DataType.INT8, ir.DataType.UINT4: ir.DataType.UINT8}


def _attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.as_int()


def _set_constant(value: ir.Value, array: np.ndarray, dtype: ir.DataType | None = None) -> None:
    tensor = ir.tensor(array, dtype=dtype, name=value.name)
    value.const_value = tensor
    value.shape = ir.Shape(array.shape)
    value.dtype = tensor.dtype


NO_QDQ_FUSION = {"session.disable_quant_qdq": "1"}
"""ORT session options that keep ONNX Runtime from fusing Q/DQ pairs into integer kernels, for a
*device* artifact with static 4-bit activation codes: ORT 1.32 fuses ``DQ → Conv → Q`` around a
layer with 8-bit (or 7-bit) weights into a QLinearConv without checking the activation type, then
rejects its own graph for a uint4 input. The ort artifact widens such codes into 8-bit containers
(:func:`widen_small_activations`); the device artifact keeps true 4-bit codes for runtimes that
take them, so ORT runs it operator by operator. Seen once a recipe quantized a conv's output
(``residuals: true``) in front of a 7-bit first conv."""


def _static(tensor: QuantizedTensor) -> bool:
    """An activation with a constant scale (computed ahead of time) and a zero point."""
    return tensor.quantize is not None and tensor.scale.const_value is not None and tensor.zero_point is not None


def _static_8bit(tensor: QuantizedTensor) -> bool:
    """A static activation with 8-bit codes."""
    return _static(tensor) and tensor.zero_point.dtype in (ir.DataType.INT8, ir.DataType.UINT8)


def session_options_for(tensors: list[QuantizedTensor], kind: str) -> dict[str, str]:
    """The session options an artifact is meant to run with beyond :data:`SESSION_CONFIG`:
    :data:`NO_MATMUL_ADD_FUSION` when some static int8 activation exists (without it ONNX Runtime
    cannot load the graph), or, in the *ort* artifact, when a static 8-bit activation feeds a
    MatMul (so the MatMul can run on an integer kernel); :data:`NO_QDQ_FUSION` when static
    activation codes are narrower than 8 bits (left so in the device artifact only)."""
    options = {}
    signed = any(_static_8bit(t) and t.zero_point.dtype == ir.DataType.INT8 for t in tensors)
    integer_matmul = kind == "ort" and any(_static_8bit(t) and any(op.op_type == "MatMul" for op in consumers_through(t.dequantized))
                                           for t in tensors)
    if signed or integer_matmul:
        options.update(NO_MATMUL_ADD_FUSION)
    if any(_static(t) and t.zero_point.dtype in _WIDER for t in tensors):
        options.update(NO_QDQ_FUSION)
    return options


def widen_small_weights(tensors: list[QuantizedTensor]) -> list[str]:
    """Store per-tensor / per-channel int4/uint4 weights of Conv/Gemm/MatMul as int8/uint8.

    Returns the names of the widened weights.
    """
    widened = []
    for tensor in tensors:
        codes = tensor.quantized
        if tensor.quantize is not None or codes.const_value is None or codes.dtype not in _WIDER:
            continue
        if _attribute(tensor.dequantize, "block_size", 0) != 0:
            continue  # blocked weights: see matmul_nbits_layout
        if not any(op.op_type in _MATMUL_OPS for op in consumers_through(tensor.dequantized)):
            continue
        wide = _WIDER[codes.dtype]
        _set_constant(codes, codes.const_value.numpy().astype(np.int8 if wide == ir.DataType.INT8 else np.uint8))
        zero_point = tensor.zero_point
        if zero_point is not None and zero_point.const_value is not None:
            _set_constant(zero_point, zero_point.const_value.numpy().astype(codes.const_value.numpy().dtype))
        widened.append(codes.name)
    return widened


def widen_small_activations(tensors: list[QuantizedTensor]) -> list[str]:
    """Store static int4/uint4 activation codes as int8/uint8, clipped to the 4-bit range first.

    ORT's QDQ fusion turns ``DQ → Conv → Q`` into QLinearConv without checking the code type, and
    then rejects its own graph for a uint4 input (seen with ORT 1.32). Here the QuantizeLinear
    gets the 4-bit type's bounds ``(type_min - z)·s`` and ``(type_max - z)·s`` as a Max/Min in
    front (what the export lowering does for ranges narrower than their type) and 8-bit zero
    points: the same codes, in a type ORT's kernels take. Returns the names of the widened codes.
    """
    widened = []
    for tensor in tensors:
        q, zero_point, scale = tensor.quantize, tensor.zero_point, tensor.scale
        if q is None or zero_point is None or zero_point.const_value is None or zero_point.dtype not in _WIDER:
            continue
        if scale.const_value is None:
            continue  # a scale computed at run time: not a static activation
        z = zero_point.const_value.numpy()
        s = np.maximum(scale.const_value.numpy().astype(np.float32), np.float32(MIN_SCALE))
        low, high = integer_range(4, signed=zero_point.dtype == ir.DataType.INT4)
        graph = q.graph
        bounds = []
        for code, which in ((low, "low"), (high, "high")):
            value = (np.float32(code) - z.astype(np.float32)) * s  # what DequantizeLinear gives for that code
            bound = ir.Value(name=f"{tensor.prefix}.wide_{which}", const_value=ir.tensor(value.astype(np.float32)))
            bound.shape, bound.dtype = ir.Shape(value.shape), ir.DataType.FLOAT
            graph.register_initializer(bound)
            bounds.append(bound)
        clip_low = ir.node("Max", [q.inputs[0], bounds[0]])
        clip_high = ir.node("Min", [clip_low.outputs[0], bounds[1]])
        graph.insert_before(q, [clip_low, clip_high])
        q.replace_input_with(0, clip_high.outputs[0])
        tensor.quantized.dtype = _WIDER[zero_point.dtype]
        _set_constant(zero_point, z.astype(np.int8 if zero_point.dtype == ir.DataType.INT4 else np.uint8))
        widened.append(tensor.quantized.name)
    return widened


def _is_power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _blocked_4bit_matrix(tensor: QuantizedTensor) -> int:
    """The block size of a constant 4-bit ``[rows, K]`` weight quantized in blocks along ``K``
    that ORT's 4-bit kernels take (a power of two ≥ 16), else 0."""
    dq, codes = tensor.dequantize, tensor.quantized
    if tensor.quantize is not None or codes.const_value is None or codes.dtype not in _WIDER:
        return 0
    block = _attribute(dq, "block_size", 0)
    if len(codes.shape) != 2 or _attribute(dq, "axis", 1) != 1 or not _is_power_of_two(block):
        return 0
    return block


def _dynamic_activation(value: ir.Value) -> ir.Value | None:
    """If ``value`` is a dequantized activation whose scale is computed at run time, the float tensor before it."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[1].const_value is not None:
        return None
    q = dq.inputs[0].producer()
    return None if q is None or q.op_type != "QuantizeLinear" else q.inputs[0]


def matmul_nbits_layout(tensors: list[QuantizedTensor]) -> list[str]:
    """Rewrite blocked 4-bit Linear weights into ORT's MatMulNBits pattern (module docstring).

    Returns the names of the rewritten weights.
    """
    rewritten = []
    for tensor in tensors:
        dq, codes = tensor.dequantize, tensor.quantized
        if not _blocked_4bit_matrix(tensor):
            continue
        uses = list(tensor.dequantized.uses())
        if len(uses) != 1 or uses[0][0].op_type != "Transpose":
            continue
        transpose = uses[0][0]
        matmuls = list(transpose.outputs[0].uses())
        if not matmuls or any(user.op_type != "MatMul" or index != 1 for user, index in matmuls):
            continue
        for value in (codes, tensor.scale, tensor.zero_point):
            if value is not None and value.const_value is not None:
                _set_constant(value, np.ascontiguousarray(value.const_value.numpy().T), value.dtype)
        dq.attributes["axis"] = ir.AttrInt64("axis", 0)
        for matmul, _ in matmuls:
            matmul.replace_input_with(1, tensor.dequantized)
            source = _dynamic_activation(matmul.inputs[0])
            if source is not None:
                matmul.replace_input_with(0, source)
        transpose.graph.remove(transpose, safe=True)
        rewritten.append(codes.name)
    return rewritten


def gather_block_quantized(tensors: list[QuantizedTensor]) -> list[str]:
    """Rewrite blocked 4-bit embedding tables read by ``Gather`` into GatherBlockQuantized
    (module docstring). A table read by anything but a row ``Gather`` (one tied to the output
    projection) is left as it is. The tensor's entry then names the new node, whose output takes
    the table's ``…_dequantized`` name. Returns the names of the rewritten tables.
    """
    rewritten = []
    for tensor in tensors:
        dq, codes = tensor.dequantize, tensor.quantized
        block = _blocked_4bit_matrix(tensor)
        if not block:
            continue
        gathers = list(tensor.dequantized.uses())
        if not gathers or any(user.op_type != "Gather" or index != 0 or _attribute(user, "axis", 0) != 0 for user, index in gathers):
            continue
        graph, name = dq.graph, tensor.dequantized.name
        tensor.dequantized.name = f"{name}.replaced"  # the whole table is no longer made: its name goes to the rows
        data = [codes, None, tensor.scale] + ([tensor.zero_point] if tensor.zero_point is not None else [])
        for number, (gather, _) in enumerate(gathers):
            data[1] = gather.inputs[1]
            fused = ir.node("GatherBlockQuantized", list(data), domain="com.microsoft", name=f"{tensor.prefix}.GatherBlockQuantized",
                            attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 4})
            fused.outputs[0].name = name if number == 0 else f"{name}.{number}"
            fused.outputs[0].dtype, fused.outputs[0].shape = gather.outputs[0].dtype, gather.outputs[0].shape
            graph.insert_before(gather, fused)
            gather.outputs[0].replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
            graph.remove(gather, safe=True)
            if number == 0:
                tensor.dequantize = fused
        graph.remove(dq, safe=True)
        graph.opset_imports.setdefault("com.microsoft", 1)
        rewritten.append(codes.name)
    return rewritten


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def global_average_pool(graph: ir.Graph) -> int:
    """Rewrite ``DQ → ReduceMean(spatial axes, keepdims) → Q`` into ``DQ → GlobalAveragePool → Q``
    (module docstring). Returns how many were rewritten."""
    rewritten = 0
    for node in list(graph):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or _attribute(node, "keepdims", 1) != 1:
            continue
        source, result = node.inputs[0], node.outputs[0]
        rank = len(source.shape) if source.shape is not None else 0
        axes = _constant_ints(node.inputs[1] if len(node.inputs) > 1 else None)
        fed = source.producer() is not None and source.producer().op_type == "DequantizeLinear"
        read = bool(result.uses()) and all(user.op_type == "QuantizeLinear" for user, _ in result.uses())
        if rank < 3 or axes is None or sorted(a % rank for a in axes) != list(range(2, rank)) or not (fed and read):
            continue
        pool = ir.node("GlobalAveragePool", [source], name=f"{node.name}.GlobalAveragePool")
        pool.outputs[0].name, pool.outputs[0].dtype, pool.outputs[0].shape = f"{result.name}.pooled", result.dtype, result.shape
        graph.insert_before(node, pool)
        result.replace_all_uses_with(pool.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def _scalar(value: ir.Value) -> float | None:
    """The value of a one-element float constant, else None."""
    if value.const_value is None or value.const_value.size != 1 or not value.dtype.is_floating_point():
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def integer_gates(gates: list[QuantizedTensor]) -> list[QuantizedTensor]:
    """Lay out the hard gates' ``Add`` and ``Div`` for ORT's integer kernels (module docstring).
    Returns the shift constants it wrote, as quantized tensors of their gate's quantizer (no
    QuantizeLinear: the sidecar lists them with ``role: constant``)."""
    constants = []
    for tensor in gates:
        dq, q = tensor.dequantize, tensor.quantize
        add = q.inputs[0].producer() if q is not None else None
        divisions = [user for user, _ in tensor.dequantized.uses()]
        if add is None or add.op_type != "Add" or len(divisions) != 1 or divisions[0].op_type != "Div":
            continue
        div = divisions[0]
        side = next((i for i in (1, 0) if _scalar(add.inputs[i]) is not None), None)  # x + 3 (or 3 + x)
        shift, divisor = (_scalar(add.inputs[side]) if side is not None else None), _scalar(div.inputs[1])
        if shift is None or divisor is None or shift <= 0 or tensor.scale.const_value is None:
            continue
        graph = dq.graph
        code, unit = ir.Value(name=f"{tensor.prefix}_shift_code"), ir.Value(name=f"{tensor.prefix}_shift_scale")
        _set_constant(code, np.array(1, np.uint8))
        _set_constant(unit, np.array(shift, np.float32))
        constant = ir.node("DequantizeLinear", [code, unit], name=f"{tensor.prefix}.shift")
        shifted = constant.outputs[0]
        shifted.name, shifted.dtype, shifted.shape = f"{tensor.prefix}_shift", ir.DataType.FLOAT, ir.Shape([])
        graph.insert_before(add, constant)
        add.replace_input_with(side, constant.outputs[0])
        folded = ir.Value(name=f"{tensor.prefix}_dequantize_scale")
        _set_constant(folded, np.float32(tensor.scale.const_value.numpy()) / np.float32(divisor))
        for value in (code, unit, folded):
            graph.register_initializer(value)
        dq.replace_input_with(1, folded)
        div.outputs[0].replace_all_uses_with(dq.outputs[0], replace_graph_outputs=True)
        graph.remove(div, safe=True)
        constants.append(QuantizedTensor(tensor.quantizer, constant, None))
    return constants

