"""The calibration metadata ``<name>.qparams.json`` that travels with every exported model.

The format is documented in ``export/FORMAT.md`` and fixed by the JSON Schema
``export/qparams.schema.json`` (shipped inside the package as :data:`SCHEMA_PATH`) plus the
cross-field checks of :func:`validate` that JSON Schema cannot express; every file is validated
before it is written and when it is read. Scales and zero points are read from the exported graph
itself, so the sidecar describes exactly what the file computes; observed ranges, observers and
SQNR come from the PyTorch quantizers.

Per-group scales (an LLM's) and lists of more than :data:`INLINE_LIMIT` scales are not copied
into the JSON: the entry refers to the initializer that holds them (``{"initializer": name,
"count": n}``) and summarises its observed range (``{"min", "max", "count"}``), so the sidecar
stays a small fraction of the model (:func:`compact`). :func:`resolve_numbers` fills the
references back in from the ONNX file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from qat.analysis.summary import weight_sqnr_db
from qat.core.bias import BIAS_QMAX, BIAS_QMIN, BiasQuantizer
from qat.core.gate import GATE_QMAX, GATE_QMIN, GateQuantizer
from qat.core.quantizer import Quantizer
from qat.core.spec import integer_range
from qat.errors import QATError
from qat.export.names import QuantizedTensor
from qat.modules import QuantizedLayer
from qat.text_files import read_json
from qat.version import __version__

FORMAT = "lightning-qat.core.qparams"
VERSION = "2.1"
READABLE_VERSIONS = ("2.0", VERSION)
"""2.1 added int32 biases (``role: bias`` tensors, a layer's ``bias``) and hard gates (``role: constant``
tensors, ``dequantize_scale``); a 2.0 file is a 2.1 file without them."""
SCHEMA_PATH = Path(__file__).with_name("qparams.schema.json")
INLINE_LIMIT = 1024
"""Most scales a per-tensor or per-channel entry lists inline (:func:`compact`); beyond, its scales
and zero points are stored by reference and its observed range summarised. 1024 keeps the
per-channel scales of common vision models readable in the JSON."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
DTYPE_RANGES = {**{f"{'' if signed else 'u'}int{bits}": integer_range(bits, signed) for bits in (4, 8, 16) for signed in (True, False)},
                "int32": integer_range(32, True)}
"""The codes each stored integer type holds; ``qmin..qmax`` must lie inside."""


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema every sidecar must satisfy."""
    return json.loads(SCHEMA_PATH.read_text())


def sidecar_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` → ``model.qparams.json`` (``model.ort.onnx`` → ``model.ort.qparams.json``)."""
    path = Path(onnx_path)
    return path.with_name(path.name.removesuffix(".onnx") + ".qparams.json")


def sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks (an LLM's weights need not fit in memory twice)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate(qparams: dict[str, Any], where: str = "qparams") -> None:
    """Raise :class:`QATError` naming the first field that breaks the format.

    Three steps: the version (a sidecar of another version is refused with what to do), the JSON
    Schema, then what JSON Schema cannot say because it compares fields or rejects what Python's
    ``json`` reads as numbers: every number finite (``NaN``, ``Infinity``), ``qmin <= qmax``,
    ``qmin..qmax`` inside the stored ``dtype`` and at most ``bits`` wide, as many scales as
    ``scale_shape`` holds and as many zero points as scales, zero points within ``[qmin, qmax]``,
    a reference naming the entry's own ``scale_tensor`` / ``zero_point_tensor``, and every layer's
    ``weight`` / ``input`` a key of ``tensors``.
    """
    if isinstance(qparams, dict) and qparams.get("format") == FORMAT and qparams.get("version") not in READABLE_VERSIONS:
        raise QATError(f"{where}: format version {qparams.get('version')} is not readable by lightning-qat {__version__}, which "
                       f"reads version {VERSION}: export the model again (qat export, or qat.export_onnx) to write a version "
                       f"{VERSION} sidecar")
    try:
        jsonschema.validate(qparams, schema())
    except jsonschema.ValidationError as error:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise QATError(f"{where}: `{field}` {error.message}") from None
    problem = next(_problems(qparams), None)
    if problem is not None:
        raise QATError(f"{where}: {problem}")


def _non_finite(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, float) and not math.isfinite(value):
        yield f"`{path}` is {value}: every number must be finite"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{path}/{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _non_finite(item, f"{path}/{i}")


def is_reference(value: Any) -> bool:
    """Whether a ``scale`` / ``zero_point`` field refers to an initializer instead of listing the numbers."""
    return isinstance(value, dict)


def count_of(value: list[Any] | dict[str, Any]) -> int:
    """How many numbers a ``scale`` / ``zero_point`` field stands for (inline or by reference)."""
    return value["count"] if is_reference(value) else len(value)


def _tensor_problems(name: str, entry: dict[str, Any]) -> Iterator[str]:
    where = f"`tensors/{name}`"
    qmin, qmax, dtype, bits = entry["qmin"], entry["qmax"], entry["dtype"], entry["bits"]
    low, high = DTYPE_RANGES[dtype]
    if qmin > qmax:
        yield f"{where} has qmin {qmin} > qmax {qmax}"
    elif qmin < low or qmax > high:
        yield f"{where} has codes [{qmin}, {qmax}], outside its dtype {dtype} [{low}, {high}]"
    elif qmax - qmin >= 2**bits:
        yield f"{where} has codes [{qmin}, {qmax}], more than its {bits} bits hold"
    scale, zero_point = entry["scale"], entry["zero_point"]
    if isinstance(scale, list) and any(s > FLOAT32_MAX for s in scale):
        yield f"`tensors/{name}/scale` holds {max(scale)}, more than a float32 scale can be ({FLOAT32_MAX:.7g})"
    shape, axis = entry["shape"], entry["axis"]
    if isinstance(shape, list) and axis is not None and not (entry["dynamic"] or -len(shape) <= axis < len(shape)):
        yield f"{where} has axis {axis}, outside its {len(shape)}-dimensional shape {shape}"
    yield from _observed_problems(name, entry["observed_min"], entry["observed_max"])
    if isinstance(zero_point, list):
        outside = [z for z in zero_point if not qmin <= z <= qmax]
        if outside:
            yield f"`tensors/{name}/zero_point` holds {outside[0]}, outside [qmin, qmax] = [{qmin}, {qmax}]"
    if entry["dynamic"]:
        return
    expected = math.prod(entry["scale_shape"])
    if count_of(scale) != expected:
        yield f"`tensors/{name}/scale` has {count_of(scale)} numbers, `scale_shape` {entry['scale_shape']} holds {expected}"
    if count_of(zero_point) != count_of(scale):
        yield f"`tensors/{name}/zero_point` has {count_of(zero_point)} numbers for {count_of(scale)} scales"
    for key, value in (("scale", scale), ("zero_point", zero_point)):
        if is_reference(value) and value["initializer"] != entry[f"{key}_tensor"]:
            yield f"`tensors/{name}/{key}` refers to `{value['initializer']}`, but `{key}_tensor` is `{entry[f'{key}_tensor']}`"


def _observed_problems(name: str, low: list[float] | dict[str, Any] | None, high: list[float] | dict[str, Any] | None) -> Iterator[str]:
    """An observed range whose minimum lies above its maximum (per channel, or the summaries' ends)."""
    if isinstance(low, dict) and isinstance(high, dict):
        low, high = [low["min"]], [high["max"]]
    if isinstance(low, list) and isinstance(high, list):
        if len(low) != len(high):
            yield f"`tensors/{name}` has {len(low)} observed minima for {len(high)} maxima"
        elif any(a > b for a, b in zip(low, high)):
            i = next(i for i, (a, b) in enumerate(zip(low, high)) if a > b)
            yield f"`tensors/{name}/observed_min` holds {low[i]} above `observed_max`'s {high[i]} (at {i})"


def _problems(qparams: dict[str, Any]) -> Iterator[str]:
    """The cross-field problems of a sidecar that passed the JSON Schema (see :func:`validate`)."""
    yield from _non_finite(qparams, "")
    for name, entry in qparams["tensors"].items():
        yield from _tensor_problems(name, entry)
    for layer, entry in qparams["layers"].items():
        for key in ("weight", "input"):
            if entry[key] is not None and entry[key] not in qparams["tensors"]:
                yield f"`layers/{layer}/{key}` is `{entry[key]}`, which is not a key of `tensors`"
        weight = qparams["tensors"].get(entry["weight"]) if entry["weight"] is not None else None
        if weight is not None and (weight["role"], weight["layer"]) != ("weight", layer):
            yield (f"`layers/{layer}/weight` is `{entry['weight']}`, the {weight['role']} of layer `{weight['layer']}` "
                   "in `tensors`")
        source = qparams["tensors"].get(entry["input"]) if entry["input"] is not None else None
        if source is not None and source["role"] != "activation":
            yield f"`layers/{layer}/input` is `{entry['input']}`, a {source['role']} in `tensors`"
        bias = entry.get("bias")
        if bias is not None and bias not in qparams["tensors"]:
            yield f"`layers/{layer}/bias` is `{bias}`, which is not a key of `tensors`"
        elif bias is not None and (qparams["tensors"][bias]["role"], qparams["tensors"][bias]["layer"]) != ("bias", layer):
            found = qparams["tensors"][bias]
            yield f"`layers/{layer}/bias` is `{bias}`, the {found['role']} of layer `{found['layer']}` in `tensors`"


def to_json(data: dict[str, Any]) -> str:
    """The text of a sidecar file holding ``data`` (the export writes it with :mod:`qat.atomic`)."""
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def layer_weights(qparams: dict[str, Any]) -> dict[str, str]:
    """Layer → the name of its integer weight, for every layer with a weight in the graph."""
    return _layer_weights(qparams["layers"])


def _layer_weights(layers: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {layer: entry["weight"] for layer, entry in layers.items() if entry["weight"]}


def read_qparams(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a sidecar."""
    data = read_json(path, "calibration metadata file")
    validate(data, str(path))
    return data


def resolve_numbers(qparams: dict[str, Any], onnx_model: str | os.PathLike[str] | onnx.ModelProto) -> dict[str, Any]:
    """A copy of ``qparams`` with every by-reference ``scale`` / ``zero_point`` replaced by its numbers.

    The numbers are read from the initializers the references name, in ``onnx_model`` (the
    sidecar's own ``.onnx`` file, or that model loaded). Observed-range summaries stay summaries:
    the model does not hold observed ranges. Consumers that need every number (the dialect writers
    in :mod:`qat.export.dialects`) take the resolved copy.

    Raises:
        QATError: a referenced initializer is missing from the model or holds another count.
    """
    model = onnx_model if isinstance(onnx_model, onnx.ModelProto) else load_onnx(Path(onnx_model))
    initializers = {t.name: t for t in model.graph.initializer}
    resolved = copy.deepcopy(qparams)
    for name, entry in resolved["tensors"].items():
        for key in ("scale", "zero_point"):
            value = entry[key]
            if not is_reference(value):
                continue
            tensor = initializers.get(value["initializer"])
            if tensor is None:
                raise QATError(f"`{value['initializer']}` ({key} of `{name}`) is not an initializer of the model")
            array = onnx.numpy_helper.to_array(tensor).reshape(-1)
            if array.size != value["count"]:
                raise QATError(f"`{value['initializer']}` ({key} of `{name}`) holds {array.size} numbers, the metadata says "
                               f"{value['count']}")
            entry[key] = array.astype(np.float64 if key == "scale" else np.int64).tolist()
    return resolved


def read_resolved(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of ``onnx_path``, validated, with every number in it (:func:`resolve_numbers`)."""
    return resolve_numbers(read_qparams(sidecar_path(onnx_path)), onnx_path)


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """``path`` loaded with :func:`onnx.load` (its initializers included), or a QATError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise QATError(f"model `{path}` does not exist")
    try:
        return onnx.load(str(path))
    except Exception as error:
        raise QATError(f"`{path}` is not a readable ONNX model: {error}") from None


def _numbers(value: ir.Value | None) -> tuple[list[Any] | None, list[int] | None]:
    if value is None or value.const_value is None:
        return None, None
    array = value.const_value.numpy()
    values = array.astype(np.float64 if array.dtype.kind == "f" else np.int64).reshape(-1).tolist()
    return values, list(array.shape)


def compact(granularity: str, scales: int) -> bool:
    """Whether an entry stores its numbers by reference: every per-group tensor (its scales grow with
    the weights, and as text they outweigh the 4-bit codes they describe), and any with more than
    :data:`INLINE_LIMIT` scales."""
    return granularity == "per_group" or scales > INLINE_LIMIT


def _observed(q: Quantizer, summarise: bool) -> tuple[list[float] | dict[str, Any] | None, list[float] | dict[str, Any] | None]:
    """The observed range, per channel or group, or with ``summarise`` its ends and count."""
    if q.observer is None or not q.calibrated:
        return None, None
    values = [v.detach().double().reshape(-1) for v in (q.observer.min_val, q.observer.max_val)]
    if not summarise:
        return values[0].tolist(), values[1].tolist()
    return tuple({"min": v.min().item(), "max": v.max().item(), "count": v.numel()} for v in values)


def _reference(values: list[Any] | None, value: ir.Value | None, by_reference: bool) -> list[Any] | dict[str, Any] | None:
    """``values`` inline, or with ``by_reference`` (and an initializer to point at) a reference to ``value``."""
    if values is None or not by_reference or value is None or value.const_value is None:
        return values
    return {"initializer": value.name, "count": len(values)}


def _dtype_name(value: ir.Value) -> str:
    return str(value.dtype.name).lower()


def _format(quantizer: Quantizer | BiasQuantizer | GateQuantizer, per_channel: bool) -> dict[str, Any]:
    """The format fields of a tensors entry: the quantizer's spec, an int32 bias's fixed format
    (its grid is the input scale times the weight scale, per channel when ``per_channel``), or a
    hard gate's fixed uint8 grid (:mod:`qat.core.gate`)."""
    if isinstance(quantizer, GateQuantizer):
        return {"role": "activation", "bits": 8, "qmin": GATE_QMIN, "qmax": GATE_QMAX, "signed": False, "symmetric": True,
                "granularity": "per_tensor", "dynamic": False, "observer": None, "learnable": False}
    if isinstance(quantizer, BiasQuantizer):
        return {"role": "bias", "bits": 32, "qmin": BIAS_QMIN, "qmax": BIAS_QMAX, "signed": True, "symmetric": True,
                "granularity": "per_channel" if per_channel else "per_tensor", "dynamic": False, "observer": None,
                "learnable": False}
    spec = quantizer.spec
    return {"role": quantizer.role, "bits": spec.bits, "qmin": spec.qmin, "qmax": spec.qmax, "signed": spec.signed,
            "symmetric": spec.fixed_zero_point, "granularity": spec.granularity.value, "dynamic": spec.dynamic,
            "observer": spec.observer.value if quantizer.observer is not None else None, "learnable": spec.learnable}


def tensor_entry(tensor: QuantizedTensor, quantizer: Quantizer | BiasQuantizer | GateQuantizer, layer_name: str) -> dict[str, Any]:
    """One ``tensors`` entry: names, format and numbers of ``tensor`` as the graph holds it."""
    dq = tensor.dequantize
    # a QuantizeLinear that writes the codes at another scale than its DequantizeLinear reads them
    # (an ort artifact's hard gate, its division folded into the reading): `scale` is the writing's
    written = tensor.quantize.inputs[1] if tensor.quantize is not None else None
    rescaled = written is not None and written is not tensor.scale and written.const_value is not None
    scale_value = written if rescaled else tensor.scale
    scale, scale_shape = _numbers(scale_value)
    zero_point, _ = _numbers(tensor.zero_point)
    if zero_point is None and scale is not None:
        zero_point = [0] * len(scale)
    fmt = _format(quantizer, bool(scale_shape))
    if isinstance(quantizer, GateQuantizer) and tensor.quantize is None:
        fmt["role"] = "constant"  # the gate's shift, DequantizeLinear(uint8 1, scale 3), for ORT's QLinearAdd
    by_reference = scale is not None and compact(fmt["granularity"], len(scale))
    observed_min, observed_max = _observed(quantizer, by_reference) if isinstance(quantizer, Quantizer) else (None, None)
    block = dq.attributes.get("block_size")
    axis = dq.attributes.get("axis", dq.attributes.get("quantize_axis"))  # GatherBlockQuantized: quantize_axis
    shape = tensor.quantized.shape
    float_value = tensor.float_value
    return {
        "role": fmt["role"], "layer": layer_name, "quantizer": tensor.quantizer,
        "float_tensor": float_value.name if float_value is not None else None if fmt["role"] == "constant" else tensor.prefix,
        "dequantized": tensor.dequantized.name,
        "scale_tensor": scale_value.name if scale_value.const_value is not None else None,
        "zero_point_tensor": tensor.zero_point.name if tensor.zero_point is not None and tensor.zero_point.const_value is not None
        else None,
        "dtype": _dtype_name(tensor.quantized), "bits": fmt["bits"], "qmin": fmt["qmin"], "qmax": fmt["qmax"],
        "signed": fmt["signed"], "symmetric": fmt["symmetric"], "granularity": fmt["granularity"],
        "axis": -1 if fmt["dynamic"] else (axis.as_int() if axis is not None and scale_shape else None),
        "block_size": block.as_int() if block is not None and block.as_int() > 0 and not fmt["dynamic"] else None,
        "dynamic": fmt["dynamic"],
        "shape": [d if isinstance(d, int) else str(d) for d in shape] if shape is not None else None,
        "scale_shape": scale_shape, "scale": _reference(scale, scale_value, by_reference),
        "zero_point": _reference([int(z) for z in zero_point], tensor.zero_point, by_reference) if zero_point is not None else None,
        "observed_min": observed_min, "observed_max": observed_max, "observer": fmt["observer"], "learnable": fmt["learnable"],
        **({"dequantize_scale": _numbers(tensor.scale)[0], "dequantize_scale_tensor": tensor.scale.name} if rescaled else {}),
    }


def io_entries(values: Sequence[ir.Value], normalization: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape], "dtype": _dtype_name(v),
             **({"normalization": normalization} if normalization else {})} for v in values]


@dataclass(frozen=True)
class GraphEntries:
    """What a sidecar says about its graph: ``inputs``, ``outputs``, ``tensors`` and ``layers``
    (without kernels). Read by :func:`describe_graph` while the graph still carries the exporter's
    node metadata; :func:`build_qparams` writes it out with what verification found."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    tensors: dict[str, dict[str, Any]]
    layers: dict[str, dict[str, Any]]

    @property
    def layer_weights(self) -> dict[str, str]:
        """Layer → the name of its integer weight, for every layer with a weight in the graph."""
        return _layer_weights(self.layers)

    @property
    def integer_weights(self) -> list[str]:
        """The integer weights, in the order of ``tensors``."""
        return [name for name, entry in self.tensors.items() if entry["role"] == "weight"]


def describe_graph(model: nn.Module, onnx_model: ir.Model, tensors: list[QuantizedTensor], inputs_of: dict[str, QuantizedTensor],
                   *, normalization: dict[str, Any] | None = None) -> GraphEntries:
    """The entries of ``onnx_model``'s sidecar that come from the graph and ``model``'s quantizers."""
    modules = dict(model.named_modules())
    entries, layers = {}, {}
    for tensor in tensors:
        quantizer = modules.get(tensor.quantizer)
        if not isinstance(quantizer, Quantizer | BiasQuantizer | GateQuantizer) or tensor.quantized.name in entries:
            continue
        entries[tensor.quantized.name] = tensor_entry(tensor, quantizer, tensor.layer)
    biases = {t.layer: t.quantized.name for t in tensors if isinstance(modules.get(t.quantizer), BiasQuantizer)}
    for tensor in tensors:
        layer = modules.get(tensor.layer)
        if not isinstance(layer, QuantizedLayer) or tensor.quantize is not None or tensor.layer in layers \
                or tensor.quantized.name in biases.values():
            continue
        source = inputs_of.get(tensor.layer)
        sqnr = weight_sqnr_db(layer)
        layers[tensor.layer] = {"type": layer.float_cls.__name__, "weight": tensor.quantized.name,
                                "input": source.quantized.name if source is not None else None,
                                "bias": biases.get(tensor.layer),
                                # not finite for a weight without error (all zero: a zero-initialised residual BatchNorm folded in)
                                "weight_sqnr_db": round(sqnr, 3) if sqnr is not None and math.isfinite(sqnr) else None}
    graph = onnx_model.graph
    return GraphEntries(io_entries(graph.inputs, normalization), io_entries(graph.outputs), entries, layers)


def build_qparams(entries: GraphEntries, *, artifact: dict[str, Any], verification: dict[str, Any],
                  kernels: dict[str, str]) -> dict[str, Any]:
    """The sidecar, whole: the graph's ``entries``, the ``artifact`` (``model``: file, kind, opset,
    sha256, session options), the ``verification`` results and each layer's ONNX Runtime kernel."""
    return {
        "format": FORMAT, "version": VERSION,
        "producer": {"name": "lightning-qat", "version": __version__, "torch": torch.__version__.split("+")[0]},
        "model": artifact,
        "inputs": entries.inputs, "outputs": entries.outputs, "tensors": entries.tensors,
        "layers": {layer: {**entry, "kernel": kernels.get(layer)} for layer, entry in entries.layers.items()},
        "verification": verification,
    }
