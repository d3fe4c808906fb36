"""Conformance cases for int4 / uint4 QuantizeLinear and DequantizeLinear (ONNX opset 21).

Why: the official ONNX backend suite has no int4/uint4 case with per-axis scales or with blocked
quantization (``block_size``), which is exactly what lightning-qat exports. These cases let a
device runtime check itself, and let our tests hold ONNX Runtime and ``onnx.reference`` to the
numeric contract (``qat.core.fake_quant``)::

    q = clip(round_half_to_even(x / s) + zp, qmin, qmax)      # float32 division, not x * (1 / s)
    y = (q - zp) * s                                          # s, zp broadcast per tensor / axis / block

What: each case is a folder in the ONNX backend-test layout, ``<case>/model.onnx`` and
``<case>/test_data_set_0/{input_0,output_0}.pb``. ``dq_*`` cases dequantize an int4/uint4
initializer (the graph adds the all-zero input ``x`` so the weight is computed at run time);
``qdq_*`` cases run a float input through QuantizeLinear → DequantizeLinear, the int4 codes staying
inside the graph (ORT's Python API cannot take or return int4 tensors). 3-bit ranges use the int4
type after a Clip (per tensor) or Min/Max against dequantized end codes (blocked), as the exporter
does. Expected outputs come from the formula above in numpy, never from a runtime.

Usage: ``python export/conformance/generate.py [out_dir]`` (default: this folder). Seeds are fixed
and the files are written byte-identically on every run.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10  # the first IR version with int4 / uint4
PRODUCER = "lightning-qat conformance generator"
HERE = Path(__file__).resolve().parent

RANGES = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}


@dataclass(frozen=True)
class Case:
    """One conformance case. ``axis`` None means per tensor; ``block_size`` 0 means per axis."""

    name: str
    kind: str  # "dq": DequantizeLinear of an initializer; "qdq": QuantizeLinear → DequantizeLinear of the input
    dtype: int  # TensorProto.INT4 or TensorProto.UINT4
    shape: tuple[int, ...]
    seed: int
    axis: int | None = None
    block_size: int = 0
    values: str = "mixed"  # qdq inputs: "mixed", "ties", "saturate", "huge", "reciprocal"
    bits: int = 4  # 3: the narrow range, applied by Clip / Min-Max before QuantizeLinear
    zero_point: bool = True  # False: no zero-point input (QuantizeLinear then names its type with output_dtype)

    @property
    def qrange(self) -> tuple[int, int]:
        """The code range ``(qmin, qmax)`` of the formula (narrower than the type for 3 bits)."""
        low, high = RANGES[self.dtype]
        if self.bits == 4:
            return low, high
        return (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if low < 0 else (0, (1 << self.bits) - 1)

    @property
    def qparam_shape(self) -> tuple[int, ...]:
        """Shape of scale and zero point in ONNX layout."""
        if self.axis is None:
            return ()
        if self.block_size == 0:
            return (self.shape[self.axis],)
        shape = list(self.shape)
        shape[self.axis] = math.ceil(shape[self.axis] / self.block_size)
        return tuple(shape)


I4, U4 = TensorProto.INT4, TensorProto.UINT4

CASES: tuple[Case, ...] = (
    # DequantizeLinear of an int4 / uint4 initializer
    Case("dq_int4_per_tensor_odd", "dq", I4, (3, 5), 101),
    Case("dq_uint4_per_tensor", "dq", U4, (4, 4), 102),
    Case("dq_int4_axis0", "dq", I4, (4, 6), 103, axis=0),
    Case("dq_uint4_axis1_odd", "dq", U4, (3, 7), 104, axis=1),
    Case("dq_int4_axis_neg2", "dq", I4, (2, 3, 5), 105, axis=-2),
    Case("dq_int4_block16_axis0_partial", "dq", I4, (40, 3), 106, axis=0, block_size=16),
    Case("dq_uint4_block16_axis1_partial", "dq", U4, (3, 40), 107, axis=1, block_size=16),
    Case("dq_int4_block32_axis1", "dq", I4, (2, 64), 108, axis=1, block_size=32),
    Case("dq_uint4_block32_axis0_odd", "dq", U4, (33, 3), 109, axis=0, block_size=32),
    Case("dq_int4_block16_axis_neg1_no_zero_point", "dq", I4, (2, 3, 40), 110, axis=-1, block_size=16, zero_point=False),
    # QuantizeLinear → DequantizeLinear of a float input
    Case("qdq_int4_per_tensor_ties", "qdq", I4, (5, 8), 201, values="ties"),
    Case("qdq_uint4_per_tensor_saturate", "qdq", U4, (4, 6), 202, values="saturate"),
    Case("qdq_int4_axis0", "qdq", I4, (4, 6), 203, axis=0),
    Case("qdq_uint4_axis1_odd", "qdq", U4, (3, 7), 204, axis=1),
    Case("qdq_int4_axis_neg2", "qdq", I4, (2, 3, 5), 205, axis=-2),
    Case("qdq_int4_block16_axis0_partial", "qdq", I4, (40, 3), 206, axis=0, block_size=16),
    Case("qdq_uint4_block16_axis1_partial", "qdq", U4, (3, 40), 207, axis=1, block_size=16),
    Case("qdq_int4_block32_axis1", "qdq", I4, (2, 64), 208, axis=1, block_size=32),
    Case("qdq_uint4_block32_axis0_odd", "qdq", U4, (33, 3), 209, axis=0, block_size=32),
    Case("qdq_int4_block16_axis_neg1_output_dtype", "qdq", I4, (2, 3, 40), 210, axis=-1, block_size=16, zero_point=False),
    Case("qdq_int4_axis1_reciprocal_trap", "qdq", I4, (4, 8), 211, axis=1, values="reciprocal"),
    Case("qdq_int4_axis0_saturate_huge", "qdq", I4, (2, 8), 212, axis=0, values="huge"),
    # 3 bits in an int4 / uint4 container
    Case("qdq_int3_per_tensor_clip", "qdq", I4, (5, 7), 301, bits=3),
    Case("qdq_uint3_block16_axis1_minmax", "qdq", U4, (3, 40), 302, axis=1, block_size=16, bits=3),
)


# ---- the formula, in numpy (independent of qat's torch code and of any ONNX runtime) ----


def expand(param: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int) -> np.ndarray:
    """Broadcast a scale / zero point from ONNX layout to ``shape`` (per tensor, per axis, blocked)."""
    if axis is None:
        return np.broadcast_to(param, shape)
    if block_size == 0:
        view = [1] * len(shape)
        view[axis] = -1
        return np.broadcast_to(param.reshape(view), shape)
    repeated = np.repeat(param, block_size, axis=axis)
    return np.take(repeated, np.arange(shape[axis]), axis=axis)  # the last block may be partial


def quantize(x: np.ndarray, s: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """``clip(round_half_to_even(x / s) + zp, qmin, qmax)``, in float32 (s, zp already expanded)."""
    with np.errstate(over="ignore"):  # x / s may overflow to ±inf, which saturates
        ratio = x.astype(np.float32) / s.astype(np.float32)
    return np.clip(np.rint(ratio) + zp.astype(np.float32), qmin, qmax).astype(np.float32)


def dequantize(q: np.ndarray, s: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """``(q - zp) * s`` in float32 (s, zp already expanded)."""
    return ((q.astype(np.float32) - zp.astype(np.float32)) * s.astype(np.float32)).astype(np.float32)


# ---- int4 tensors ----


def pack_int4(values: np.ndarray) -> bytes:
    """Two 4-bit values per byte over the row-major flattened tensor, the first in the low nibble;
    an odd count leaves the last high nibble 0."""
    nibbles = (values.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def int4_tensor(name: str, dtype: int, values: np.ndarray) -> TensorProto:
    """An int4 / uint4 initializer, packed here by hand (not by onnx's helper) so the layout is explicit."""
    tensor = TensorProto(name=name, data_type=dtype, dims=list(values.shape))
    tensor.raw_data = pack_int4(values)
    return tensor


def float_tensor(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


# ---- parameters and inputs ----


def dyadic_scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Scales ``m · 2**-e`` (m odd ≤ 7): products with ``k + 0.5`` are exact, so ties stay exact ties."""
    mantissa = rng.choice(np.array([1, 3, 5, 7]), size=shape)
    exponent = rng.integers(3, 9, size=shape)
    return np.ldexp(mantissa.astype(np.float64), -exponent).astype(np.float32)


def zero_points(rng: np.random.Generator, case: Case) -> np.ndarray:
    if not case.zero_point:
        return np.zeros(case.qparam_shape, np.int64)
    qmin, qmax = case.qrange
    if case.values == "ties":  # odd: catches round(x / s + zp) in place of round(x / s) + zp
        return np.full(case.qparam_shape, -3 if qmin < 0 else 5, np.int64)
    if case.values == "huge":  # both signs: an int32 overflow then wraps one way or the other
        return np.resize(np.array([-3, 2] if qmin < 0 else [3, 12]), case.qparam_shape)
    return rng.integers(qmin, qmax + 1, size=case.qparam_shape)


def mixed_inputs(rng: np.random.Generator, s: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Uniform over the range ±1.5 steps (some saturate), every third element an exact tie ``(k + 0.5)·s``."""
    low, high = (qmin - zp - 1.5) * s.astype(np.float64), (qmax - zp + 1.5) * s.astype(np.float64)
    x = low + rng.uniform(0.0, 1.0, size=s.shape) * (high - low)
    k = rng.integers(qmin - zp - 1, qmax - zp + 1)
    ties = np.arange(x.size).reshape(x.shape) % 3 == 0
    return np.where(ties, (k + 0.5) * s, x).astype(np.float32)


def tie_inputs(s: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Every half-step ``(k + 0.5)·s`` from below the range to above it, then whole steps."""
    ks = np.arange(qmin - zp.max() - 2, qmax - zp.min() + 2, dtype=np.float64)
    values = np.concatenate([ks + 0.5, ks])
    return (np.resize(values, s.shape) * s).astype(np.float32)


def saturating_inputs(rng: np.random.Generator, s: np.ndarray) -> np.ndarray:
    """Magnitudes from 10 to 1e7 steps, both signs: far outside any 4-bit range (no exp/log: libm may differ by an ulp)."""
    steps = rng.uniform(1.0, 10.0, size=s.shape) * 10.0 ** rng.integers(1, 7, size=s.shape) * rng.choice([-1.0, 1.0], size=s.shape)
    return (steps * s).astype(np.float32)


def huge_inputs(s: np.ndarray) -> np.ndarray:
    """``|x / s| ≥ 2**31`` (overflows an int32 cast) up to ``x / s`` = ±inf in float32 (scales < 1); must saturate."""
    magnitudes = np.array([2.0**31, 2.0**32, 5e9, 1e12, 2.0**40, 1e20, 3e38, float(np.finfo(np.float32).max)])
    signs = np.resize(np.array([1.0, -1.0, -1.0, 1.0]), s.shape)
    return (np.resize(magnitudes, s.shape) * signs).astype(np.float32)


def reciprocal_trap_inputs(rng: np.random.Generator, s: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Values next to ties where ``rint(x / s)`` differs from ``rint(x * (1 / s))`` in float32."""
    s32 = s.astype(np.float32)
    inv = (np.float32(1.0) / s32).astype(np.float32)
    out = np.empty(s.shape, np.float32)
    for index in np.ndindex(s.shape):
        out[index] = _trap_value(rng, s32[index], inv[index], int(qmin - zp[index]), int(qmax - zp[index]))
    return out


def _trap_value(rng: np.random.Generator, s: np.float32, inv: np.float32, kmin: int, kmax: int) -> np.float32:
    for _ in range(10_000):
        tie = np.float32((rng.integers(kmin, kmax) + 0.5) * float(s))
        for x in (tie, np.nextafter(tie, np.float32(np.inf)), np.nextafter(tie, np.float32(-np.inf))):
            if np.rint(x / s) != np.rint(x * inv):
                return np.float32(x)
    raise RuntimeError(f"no reciprocal trap for scale {s}")


def trap_scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Scales whose float32 reciprocal is inexact (so ``x * (1/s)`` can round differently from ``x / s``)."""
    return rng.uniform(0.01, 0.2, size=shape).astype(np.float32)


def qdq_inputs(rng: np.random.Generator, case: Case, s: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """The float input of a Q→DQ case; ``s`` and ``zp`` are already expanded to the input's shape."""
    qmin, qmax = case.qrange
    if case.values == "ties":
        return tie_inputs(s, zp, qmin, qmax)
    if case.values == "saturate":
        return saturating_inputs(rng, s)
    if case.values == "huge":
        return huge_inputs(s)
    if case.values == "reciprocal":
        return reciprocal_trap_inputs(rng, s, zp, qmin, qmax)
    return mixed_inputs(rng, s, zp, qmin, qmax)


# ---- graphs ----


def layout_attributes(case: Case) -> dict[str, int]:
    attributes = {}
    if case.axis is not None:
        attributes["axis"] = case.axis
    if case.block_size:
        attributes["block_size"] = case.block_size
    return attributes


def qparam_inputs(case: Case) -> list[str]:
    return ["scale", "zero_point"] if case.zero_point else ["scale"]


def dq_nodes(case: Case) -> list[onnx.NodeProto]:
    return [
        helper.make_node("DequantizeLinear", ["w_q", *qparam_inputs(case)], ["w"], **layout_attributes(case)),
        helper.make_node("Add", ["x", "w"], ["y"]),
    ]


def narrow_nodes(case: Case) -> list[onnx.NodeProto]:
    """Clip to ``[(qmin - zp)·s, (qmax - zp)·s]``: Clip with scalars per tensor, else Min/Max against
    DequantizeLinear of constant end codes (as qat's exporter writes it)."""
    if case.axis is None:
        return [helper.make_node("Clip", ["x", "x_min", "x_max"], ["x_clipped"])]
    attributes = layout_attributes(case)
    return [
        helper.make_node("DequantizeLinear", ["qmin_codes", *qparam_inputs(case)], ["x_min"], **attributes),
        helper.make_node("DequantizeLinear", ["qmax_codes", *qparam_inputs(case)], ["x_max"], **attributes),
        helper.make_node("Max", ["x", "x_min"], ["x_low"]),
        helper.make_node("Min", ["x_low", "x_max"], ["x_clipped"]),
    ]


def qdq_nodes(case: Case) -> list[onnx.NodeProto]:
    nodes = narrow_nodes(case) if case.bits < 4 else []
    source = "x_clipped" if nodes else "x"
    attributes = layout_attributes(case)
    q_attributes = attributes if case.zero_point else {**attributes, "output_dtype": case.dtype}
    return [
        *nodes,
        helper.make_node("QuantizeLinear", [source, *qparam_inputs(case)], ["q"], **q_attributes),
        helper.make_node("DequantizeLinear", ["q", *qparam_inputs(case)], ["y"], **attributes),
    ]


def narrow_initializers(case: Case, s: np.ndarray, zp: np.ndarray) -> list[TensorProto]:
    qmin, qmax = case.qrange
    if case.axis is None:
        return [float_tensor("x_min", dequantize(np.float32(qmin), s, zp)), float_tensor("x_max", dequantize(np.float32(qmax), s, zp))]
    return [
        int4_tensor("qmin_codes", case.dtype, np.full(case.shape, qmin)),
        int4_tensor("qmax_codes", case.dtype, np.full(case.shape, qmax)),
    ]


def make_model(case: Case, nodes: list[onnx.NodeProto], initializers: list[TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        case.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, case.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, case.shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name=PRODUCER)
    onnx.checker.check_model(model, full_check=True)
    return model


# ---- cases ----


def build_dq(case: Case) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    qmin, qmax = case.qrange
    scale = rng.uniform(0.001, 0.5, size=case.qparam_shape).astype(np.float32)
    zp = zero_points(rng, case)
    codes = rng.integers(qmin, qmax + 1, size=case.shape)
    codes.flat[:2] = (qmin, qmax)  # both ends of the range always appear
    initializers = [int4_tensor("w_q", case.dtype, codes), float_tensor("scale", scale)]
    if case.zero_point:
        initializers.append(int4_tensor("zero_point", case.dtype, zp))
    x = np.zeros(case.shape, np.float32)
    y = x + dequantize(codes, expand(scale, case.shape, case.axis, case.block_size), expand(zp, case.shape, case.axis, case.block_size))
    return make_model(case, dq_nodes(case), initializers), x, y.astype(np.float32)


def build_qdq(case: Case) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    qmin, qmax = case.qrange
    if case.values == "reciprocal":
        scale = trap_scales(rng, case.qparam_shape)
    elif case.values == "ties":
        scale = np.float32(3 / 16) * np.ones(case.qparam_shape, np.float32)
    else:
        scale = dyadic_scales(rng, case.qparam_shape)
    zp = zero_points(rng, case)
    s, z = expand(scale, case.shape, case.axis, case.block_size), expand(zp, case.shape, case.axis, case.block_size)
    x = qdq_inputs(rng, case, s, z)
    y = dequantize(quantize(x, s, z, qmin, qmax), s, z)
    initializers = [float_tensor("scale", scale)]
    if case.zero_point:
        initializers.append(int4_tensor("zero_point", case.dtype, zp))
    if case.bits < 4:
        initializers += narrow_initializers(case, scale, zp)
    return make_model(case, qdq_nodes(case), initializers), x, y


def build(case: Case) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """``(model, input, expected output)`` of one case."""
    return build_dq(case) if case.kind == "dq" else build_qdq(case)


def write_case(case: Case, out_dir: Path) -> None:
    model, x, y = build(case)
    data_dir = out_dir / case.name / "test_data_set_0"
    data_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / case.name / "model.onnx").write_bytes(model.SerializeToString())
    (data_dir / "input_0.pb").write_bytes(numpy_helper.from_array(x, "x").SerializeToString())
    (data_dir / "output_0.pb").write_bytes(numpy_helper.from_array(y, "y").SerializeToString())


def generate(out_dir: Path = HERE) -> list[Path]:
    """Write every case under ``out_dir``; returns the case folders."""
    for case in CASES:
        write_case(case, out_dir)
    return [out_dir / case.name for case in CASES]


if __name__ == "__main__":
    folders = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    print(f"wrote {len(folders)} cases under {folders[0].parent}")
