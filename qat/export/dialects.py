"""Convert the qparams sidecar to other calibration dialects: AIMET / QNN encodings and a TensorRT cache.

Our convention (ONNX's): ``q = clamp(round(x / s) + zp, qmin, qmax)`` and ``x ≈ (q - zp) * s``, with
``[qmin, qmax]`` the full (or narrow: one code fewer at the bottom) range of a ``bits``-bit integer.

**AIMET / QNN encodings 1.0.0.** AIMET and QNN dequantize ``x = (q_u + offset) * scale`` with an
unsigned code ``q_u`` in ``[0, 2**bw - 1]``. Our code is ``q = q_u + low`` with ``low = -2**(bits-1)``
for signed types and ``0`` for unsigned ones, so ``x = (q_u + low - zp) * s`` and therefore::

    bw = bits,   scale = s,   offset = low - zp   (signed: -zp - 2**(bits-1);  unsigned: -zp)

``bits`` (not the container dtype) sets ``bw``: a 3-bit quantizer stored in int4 is ``bw = 3``.
per_tensor → ``PER_TENSOR``; per_channel weights → ``PER_CHANNEL`` (1.0.0 has no axis field: the
consumer applies the scales along the output channels, so the axis must be 0, or 1 for ConvTranspose);
per_group weights → ``PER_BLOCK`` with ``block_size``, which 1.0.0 only defines for blocks along the
input channels (axis 1) of a weight whose scales are ``(out, in / block_size)``: Linear or 1x1 conv.
Activations use their ONNX ``float_tensor`` name, weights their PyTorch parameter name.

**TensorRT calibration cache** (the legacy implicit-INT8 text file). TensorRT's INT8 is symmetric
per tensor with ``scale = amax / 127``. ``amax`` is ``max(|observed_min|, |observed_max|)`` when the
sidecar has a finite observed range and the scale was not learned (a learned scale moved away from
the observed range), otherwise the larger end of our grid, ``max(|(qmin - zp) s|, |(qmax - zp) s|)``.
Each line is ``<float_tensor>: <8 hex digits>``, the big-endian IEEE float32 bytes of that scale.

Omitted, with the reason logged (see :func:`omitted_tensors`): dynamic per-token activations (scales
are computed at run time, there is nothing static to write), and for TensorRT also weights (TensorRT
computes weight scales itself) and activations wider than 8 bits (no entry: the layer stays in float).
Granularities a dialect cannot express raise :class:`~qat.errors.QATError` naming the tensor.

**Input.** Every function takes a parsed sidecar whose numbers are all in it. A sidecar stores
long scale lists (an LLM's per-group scales) by reference to the model's initializers; read it
with :func:`qat.export.sidecar.read_resolved` (``read_resolved("net.onnx")``) or fill a parsed
one with :func:`qat.export.sidecar.resolve_numbers`. A reference left unresolved is a QATError
naming the tensor.
"""

# Sources: AIMET's ``AffineEncoding.to_qnn_encoding_dict`` (quic/aimet, aimet_torch v2
# ``quantization/affine/encoding.py``, the "1.0.0" branch) and the QNN ``Qnn_BwScaleOffset_t`` docs
# (``float = (quantized + offset) * scale``); NVIDIA TAO's ``_calibration_cache_from_dict``
# (``TRT-<ver>-EntropyCalibration2`` header, ``scale = amax / 127`` as float32 bits in hex).

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from qat.atomic import write_atomic
from qat.core.spec import integer_range
from qat.errors import QATError

log = logging.getLogger(__name__)

AIMET_ENCODING_VERSION = "1.0.0"
TRT_INT8_MAX = 127
Dialect = Literal["aimet", "tensorrt"]


def _tensors(qparams: dict) -> dict[str, dict]:
    if not isinstance(qparams, dict) or not isinstance(qparams.get("tensors"), dict):
        raise QATError("qparams has no `tensors` mapping: expected the lightning-qat qparams sidecar")
    return qparams["tensors"]


def _field(name: str, entry: dict, key: str) -> Any:
    if key not in entry:
        raise QATError(f"tensor `{name}`: the qparams entry has no `{key}` field")
    return entry[key]


def _numbers(name: str, entry: dict, key: str) -> list:
    value = _field(name, entry, key)
    if isinstance(value, dict):
        raise QATError(f"tensor `{name}`: the {key}s are stored in the model (`{value.get('initializer')}`); read the sidecar with "
                       "qat.export.sidecar.read_resolved(onnx_path) or resolve_numbers(qparams, onnx_path) first")
    return value or []


def _grid(name: str, entry: dict) -> tuple[int, int, list[float], list[int]]:
    """``(bits, low, scale, zero_point)`` after checking the entry describes a ``bits``-bit grid."""
    bits, qmin, qmax, signed = (_field(name, entry, k) for k in ("bits", "qmin", "qmax", "signed"))
    low, high = integer_range(bits, signed)
    if qmax != high or qmin not in (low, low + 1):
        raise QATError(f"tensor `{name}`: codes [{qmin}, {qmax}] are not a {bits}-bit {'signed' if signed else 'unsigned'} range")
    scale = [float(s) for s in _numbers(name, entry, "scale")]
    zero_point = [int(z) for z in _numbers(name, entry, "zero_point")]
    if not scale or len(scale) != len(zero_point):
        raise QATError(f"tensor `{name}`: needs as many zero points as scales (got {len(scale)} and {len(zero_point)})")
    if not all(math.isfinite(s) and s > 0 for s in scale):
        raise QATError(f"tensor `{name}`: every scale must be finite and positive")
    return bits, low, scale, zero_point


def _omission(entry: dict, dialect: Dialect) -> str | None:
    if entry.get("role") == "constant":
        return ("a constant operand written as a quantized tensor for ONNX Runtime's fusions (a hard gate's shift): "
                "the target's converter quantizes constants itself")
    if entry.get("role") == "bias":
        return ("an int32 bias at input scale × weight scale: the target's converter derives it from those two encodings "
                "(QNN, TensorRT), so it has no encoding of its own")
    if entry.get("dynamic"):
        return "dynamic (per-token) scales are computed at run time; there is no static encoding"
    if dialect == "tensorrt" and entry.get("role") == "weight":
        return "TensorRT calibrates activations only; it computes weight scales from the weights"
    if dialect == "tensorrt" and int(entry.get("bits", 8)) > 8:
        return f"TensorRT's implicit INT8 cannot hold a {entry['bits']}-bit activation; without an entry the layer stays in float"
    return None


def omitted_tensors(qparams: dict, dialect: Dialect) -> dict[str, str]:
    """The quantized tensors a dialect leaves out, each with the reason.

    Args:
        qparams: the qparams sidecar with its numbers resolved (:func:`qat.export.sidecar.read_resolved`).
        dialect: ``"aimet"`` or ``"tensorrt"``.

    Returns:
        ``{quantized tensor name: reason}``, in sidecar order.

    Example:
        >>> q = {"tensors": {"fc.input_quantized": {"role": "activation", "dynamic": True}}}
        >>> list(omitted_tensors(q, "aimet"))
        ['fc.input_quantized']
    """
    reasons = {name: _omission(entry, dialect) for name, entry in _tensors(qparams).items()}
    return {name: reason for name, reason in reasons.items() if reason}


def _kept(qparams: dict, dialect: Dialect) -> Iterator[tuple[str, dict]]:
    for name, entry in _tensors(qparams).items():
        reason = _omission(entry, dialect)
        if reason:
            log.info("%s: leaving out `%s`: %s", dialect, name, reason)
        else:
            yield name, entry


def _unique(seen: dict[str, tuple[str, Any]], key: str, source: str, value: Any) -> bool:
    """True when ``key`` is new; QATError when another quantizer gave ``key`` different numbers."""
    if key not in seen:
        seen[key] = (source, value)
        return True
    if seen[key][1] != value:
        raise QATError(f"tensors `{seen[key][0]}` and `{source}` quantize `{key}` differently; the file holds one encoding per tensor")
    return False


def _aimet_entry(qparams: dict, name: str, entry: dict) -> dict:
    bits, low, scale, zero_point = _grid(name, entry)
    role, gran = _field(name, entry, "role"), _field(name, entry, "granularity")
    enc: dict[str, Any] = {"name": _field(name, entry, "float_tensor"), "dtype": "INT", "enc_type": "PER_TENSOR", "bw": bits}
    enc |= {"is_sym": bool(_field(name, entry, "symmetric")), "scale": scale, "offset": [low - z for z in zero_point]}
    axis = entry.get("axis")
    if gran == "per_tensor" and len(scale) == 1:
        return enc
    if gran == "per_channel" and role == "weight":
        layer_type = str(((qparams.get("layers") or {}).get(entry.get("layer")) or {}).get("type") or "")
        if axis != 0 and not (axis == 1 and layer_type.startswith("ConvTranspose")):
            raise QATError(f"tensor `{name}`: AIMET 1.0.0 has no axis field; per-channel weight scales must run along axis 0, got {axis}")
        return enc | {"enc_type": "PER_CHANNEL"}
    if gran == "per_group" and role == "weight":
        shape, block = list(_field(name, entry, "shape")), int(_field(name, entry, "block_size"))
        if axis != 1 or len(shape) < 2 or any(d != 1 for d in shape[2:]) or shape[1] % block or len(scale) != shape[0] * shape[1] // block:
            raise QATError(
                f"tensor `{name}`: AIMET 1.0.0 PER_BLOCK needs blocks that divide axis 1 of an (out, in) or 1x1-conv weight; "
                f"got shape {shape}, axis {axis}, block_size {block}"
            )
        return enc | {"enc_type": "PER_BLOCK", "block_size": block}
    raise QATError(f"tensor `{name}`: AIMET 1.0.0 cannot express a {gran} {role} ({len(scale)} scales)")


def aimet_encodings(qparams: dict) -> dict:
    """AIMET / QNN encodings, version 1.0.0 (``sim.export(..., encoding_version="1.0.0")`` form).

    Each encoding is ``{"name", "dtype": "INT", "enc_type", "bw", "is_sym", "scale", "offset"}`` plus
    ``"block_size"`` for ``PER_BLOCK``; ``offset = -zp - 2**(bits-1)`` (signed) or ``-zp`` (unsigned).
    Dynamic (per-token) activations are left out (see :func:`omitted_tensors`).

    Args:
        qparams: the qparams sidecar with its numbers resolved (:func:`qat.export.sidecar.read_resolved`).

    Returns:
        ``{"version": "1.0.0", "activation_encodings": [...], "param_encodings": [...]}``.

    Raises:
        QATError: a tensor whose granularity 1.0.0 cannot express, or a malformed entry (named).

    Example:
        >>> q = {"tensors": {"conv1.input_quantized": {
        ...     "role": "activation", "float_tensor": "x", "bits": 8, "qmin": -128, "qmax": 127, "signed": True,
        ...     "symmetric": False, "granularity": "per_tensor", "dynamic": False, "scale": [0.02], "zero_point": [-7]}}}
        >>> aimet_encodings(q)["activation_encodings"]
        [{'name': 'x', 'dtype': 'INT', 'enc_type': 'PER_TENSOR', 'bw': 8, 'is_sym': False, 'scale': [0.02], 'offset': [-121]}]
    """
    out: dict[str, Any] = {"version": AIMET_ENCODING_VERSION, "activation_encodings": [], "param_encodings": []}
    seen: dict[str, dict[str, tuple[str, Any]]] = {"activation_encodings": {}, "param_encodings": {}}
    for name, entry in _kept(qparams, "aimet"):
        enc = _aimet_entry(qparams, name, entry)
        section = "param_encodings" if entry["role"] == "weight" else "activation_encodings"
        if _unique(seen[section], enc["name"], name, enc):
            out[section].append(enc)
    return out


def _trt_amax(name: str, entry: dict) -> float:
    _bits, _low, scale, zero_point = _grid(name, entry)
    if entry.get("granularity") != "per_tensor" or len(scale) != 1:
        raise QATError(f"tensor `{name}`: TensorRT's calibration cache holds one scale per tensor; got {entry.get('granularity')}")
    low, high = (_observed(entry.get(key)) for key in ("observed_min", "observed_max"))
    if low and high and not entry.get("learnable"):
        amax = max(abs(float(v)) for v in [*low, *high])
        if math.isfinite(amax) and amax > 0:
            return amax
    return max(abs((entry["qmin"] - zero_point[0]) * scale[0]), abs((entry["qmax"] - zero_point[0]) * scale[0]))


def _observed(value: list | dict | None) -> list:
    """An observed range's values; a long one is summarised as ``{"min", "max", "count"}``, whose ends bound them all."""
    return [value["min"], value["max"]] if isinstance(value, dict) else list(value or [])


def tensorrt_calibration_cache(qparams: dict, trt_version: str = "8600") -> str:
    """TensorRT's legacy (implicit INT8) calibration cache text for the static activations.

    Use it with the float (QDQ-free) ONNX graph: TensorRT ignores the cache for a graph with Q/DQ
    nodes, and the tensor names are the activations' ONNX ``float_tensor`` names.

    Args:
        qparams: the qparams sidecar with its numbers resolved (:func:`qat.export.sidecar.read_resolved`).
        trt_version: the version field of the header, digits only (``"8600"``, ``"100900"``).

    Returns:
        ``TRT-<ver>-EntropyCalibration2`` then ``<name>: <hex of float32 amax / 127>`` lines.

    Raises:
        QATError: a per-channel (or other non per-tensor) activation, or a malformed entry (named).

    Example:
        >>> q = {"tensors": {"conv1.input_quantized": {
        ...     "role": "activation", "float_tensor": "x", "bits": 8, "qmin": -128, "qmax": 127, "signed": True,
        ...     "symmetric": True, "granularity": "per_tensor", "dynamic": False, "scale": [0.5], "zero_point": [0],
        ...     "observed_min": [-63.5], "observed_max": [20.0]}}}
        >>> print(tensorrt_calibration_cache(q), end="")
        TRT-8600-EntropyCalibration2
        x: 3f000000
    """
    if not str(trt_version).isdigit():
        raise QATError(f"trt_version must be digits such as `8600`; got `{trt_version}`")
    lines, seen = [f"TRT-{trt_version}-EntropyCalibration2"], {}
    for name, entry in _kept(qparams, "tensorrt"):
        tensor = _field(name, entry, "float_tensor")
        code = struct.pack(">f", _trt_amax(name, entry) / TRT_INT8_MAX).hex()
        if _unique(seen, tensor, name, code):
            lines.append(f"{tensor}: {code}")
    return "\n".join(lines) + "\n"


def write_aimet_encodings(qparams: dict, path: str | os.PathLike) -> Path:
    """Write :func:`aimet_encodings` as JSON to ``path`` atomically (``.<name>.tmp``, then rename); return ``path``.

    Args:
        qparams: the qparams sidecar.
        path: the file to write, e.g. ``model.encodings``; its folder must exist (else QATError).

    Example:
        >>> import json, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> json.loads(write_aimet_encodings({"tensors": {}}, f"{folder}/m.encodings").read_text())["version"]
        '1.0.0'
    """
    return write_atomic(path, json.dumps(aimet_encodings(qparams), indent=2, allow_nan=False) + "\n")


def write_tensorrt_calibration_cache(qparams: dict, path: str | os.PathLike, trt_version: str = "8600") -> Path:
    """Write :func:`tensorrt_calibration_cache` to ``path`` atomically (``.<name>.tmp``, then rename); return ``path``.

    Args:
        qparams: the qparams sidecar.
        path: the file to write, e.g. ``calibration.cache``; its folder must exist (else QATError).
        trt_version: the version field of the header.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> write_tensorrt_calibration_cache({"tensors": {}}, f"{folder}/calib.cache").read_text()
        'TRT-8600-EntropyCalibration2\\n'
    """
    return write_atomic(path, tensorrt_calibration_cache(qparams, trt_version))
