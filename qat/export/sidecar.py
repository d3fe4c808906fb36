"""The calibration metadata ``<name>.qparams.json`` that travels with every exported model.

The format is documented in ``export/FORMAT.md`` and fixed by the JSON Schema
``export/qparams.schema.json`` (shipped inside the package as :data:`SCHEMA_PATH`); every file is
validated against it before it is written. Scales and zero points are read from the exported
graph itself, so the sidecar describes exactly what the file computes; observed ranges,
observers and SQNR come from the PyTorch quantizers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from qat.atomic import write_atomic
from qat.control import quantizers
from qat.errors import QATError
from qat.export.names import QuantizedTensor
from qat.modules import QuantizedLayer
from qat.quantizer import Quantizer
from qat.summary import weight_sqnr_db
from qat.version import __version__

FORMAT = "lightning-qat.qparams"
VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("qparams.schema.json")


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema every sidecar must satisfy."""
    return json.loads(SCHEMA_PATH.read_text())


def sidecar_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` → ``model.qparams.json`` (``model.ort.onnx`` → ``model.ort.qparams.json``)."""
    path = Path(onnx_path)
    return path.with_name(path.name.removesuffix(".onnx") + ".qparams.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def validate(qparams: dict[str, Any], where: str = "qparams") -> None:
    """Raise :class:`QATError` naming the first field that breaks the schema."""
    try:
        jsonschema.validate(qparams, schema())
    except jsonschema.ValidationError as error:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise QATError(f"{where}: `{field}` {error.message}") from None


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write ``data`` as JSON with :func:`qat.atomic.write_atomic`."""
    return write_atomic(path, json.dumps(data, indent=1) + "\n")


def layer_weights(qparams: dict[str, Any]) -> dict[str, str]:
    """Layer → the name of its integer weight, for every layer with a weight in the graph."""
    return {layer: entry["weight"] for layer, entry in qparams["layers"].items() if entry["weight"]}


def read_qparams(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a sidecar."""
    path = Path(path)
    if not path.is_file():
        raise QATError(f"calibration metadata `{path}` does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise QATError(f"`{path}` is not valid JSON: {error}") from None
    validate(data, str(path))
    return data


def _numbers(value: ir.Value | None) -> tuple[list[Any] | None, list[int] | None]:
    if value is None or value.const_value is None:
        return None, None
    array = value.const_value.numpy()
    values = array.astype(np.float64 if array.dtype.kind == "f" else np.int64).reshape(-1).tolist()
    return values, list(array.shape)


def _observed(q: Quantizer) -> tuple[list[float] | None, list[float] | None]:
    if q.observer is None or not q.calibrated:
        return None, None
    return q.observer.min_val.reshape(-1).tolist(), q.observer.max_val.reshape(-1).tolist()


def _dtype_name(value: ir.Value) -> str:
    return str(value.dtype.name).lower()


def tensor_entry(tensor: QuantizedTensor, quantizer: Quantizer, layer_name: str) -> dict[str, Any]:
    """One ``tensors`` entry: names, format and numbers of ``tensor`` as the graph holds it."""
    spec, dq = quantizer.spec, tensor.dequantize
    scale, scale_shape = _numbers(tensor.scale)
    zero_point, _ = _numbers(tensor.zero_point)
    if zero_point is None and scale is not None:
        zero_point = [0] * len(scale)
    observed_min, observed_max = _observed(quantizer)
    block = dq.attributes.get("block_size")
    axis = dq.attributes.get("axis", dq.attributes.get("quantize_axis"))  # GatherBlockQuantized: quantize_axis
    shape = tensor.quantized.shape
    float_value = tensor.float_value
    return {
        "role": quantizer.role, "layer": layer_name, "quantizer": tensor.quantizer,
        "float_tensor": float_value.name if float_value is not None else tensor.prefix,
        "dequantized": tensor.dequantized.name,
        "scale_tensor": tensor.scale.name if tensor.scale.const_value is not None else None,
        "zero_point_tensor": tensor.zero_point.name if tensor.zero_point is not None and tensor.zero_point.const_value is not None
        else None,
        "dtype": _dtype_name(tensor.quantized), "bits": spec.bits, "qmin": spec.qmin, "qmax": spec.qmax,
        "signed": spec.signed, "symmetric": spec.symmetric, "granularity": spec.granularity.value,
        "axis": -1 if spec.dynamic else (axis.as_int() if axis is not None and scale_shape else None),
        "block_size": block.as_int() if block is not None and block.as_int() > 0 and not spec.dynamic else None,
        "dynamic": spec.dynamic,
        "shape": [d if isinstance(d, int) else str(d) for d in shape] if shape is not None else None,
        "scale_shape": scale_shape, "scale": scale, "zero_point": [int(z) for z in zero_point] if zero_point is not None else None,
        "observed_min": observed_min, "observed_max": observed_max,
        "observer": spec.observer.value if quantizer.observer is not None else None, "learnable": spec.learnable,
    }


def io_entries(values: Sequence[ir.Value], normalization: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape], "dtype": _dtype_name(v),
             **({"normalization": normalization} if normalization else {})} for v in values]


def build_qparams(model: nn.Module, onnx_model: ir.Model, tensors: list[QuantizedTensor], inputs_of: dict[str, QuantizedTensor],
                  *, normalization: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar of ``onnx_model`` (``model``, ``verification`` and layer kernels are filled in later)."""
    by_name = dict(quantizers(model))
    modules = dict(model.named_modules())
    entries, layers = {}, {}
    for tensor in tensors:
        quantizer = by_name.get(tensor.quantizer)
        if quantizer is None or tensor.quantized.name in entries:
            continue
        entries[tensor.quantized.name] = tensor_entry(tensor, quantizer, tensor.layer)
    for tensor in tensors:
        layer = modules.get(tensor.layer)
        if not isinstance(layer, QuantizedLayer) or tensor.quantize is not None or tensor.layer in layers:
            continue
        source = inputs_of.get(tensor.layer)
        sqnr = weight_sqnr_db(layer)
        layers[tensor.layer] = {"type": layer.float_cls.__name__, "weight": tensor.quantized.name,
                                "input": source.quantized.name if source is not None else None,
                                "weight_sqnr_db": round(sqnr, 3) if sqnr is not None else None, "kernel": None}
    graph = onnx_model.graph
    return {
        "format": FORMAT, "version": VERSION,
        "producer": {"name": "lightning-qat", "version": __version__, "torch": torch.__version__.split("+")[0]},
        "model": {},
        "inputs": io_entries(graph.inputs, normalization), "outputs": io_entries(graph.outputs),
        "tensors": entries, "layers": layers, "verification": {},
    }
