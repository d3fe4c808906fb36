"""`qat verify`: re-check an exported model against its calibration metadata, without PyTorch.

What a device team runs before shipping a pair of files it received:

1. the sidecar validates against the JSON Schema, and its ``sha256`` is the model file's;
2. every quantized tensor it lists is in the graph with the recorded integer type, and the
   scale and zero-point initializers hold exactly the recorded numbers;
3. ONNX Runtime loads the model with the recorded session options and runs it on inputs of the
   recorded sizes, giving finite outputs of the recorded sizes;
4. the kernel each layer runs on is the one recorded at export (a different ORT build may fuse
   less).

Parity with the PyTorch model is measured at export time (it needs the PyTorch model) and is
reported from the sidecar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from qat.errors import QATError
from qat.export import kernels
from qat.export.parity import run_session
from qat.export.sidecar import layer_weights, read_qparams, sha256, sidecar_path

_NUMPY = {"float": np.float32, "float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
          "bool": np.bool_, "uint8": np.uint8, "int8": np.int8}


@dataclass
class VerifyReport:
    """What :func:`verify_artifact` found; ``problems`` is empty when the pair is consistent."""

    path: Path
    qparams: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_tensors(model: onnx.ModelProto, qparams: dict[str, Any], problems: list[str]) -> None:
    initializers = {t.name: t for t in model.graph.initializer}
    produced = {name for node in model.graph.node for name in node.output}
    for name, entry in qparams["tensors"].items():
        if name in initializers:
            stored = onnx.TensorProto.DataType.Name(initializers[name].data_type).lower()
            if stored != entry["dtype"]:
                problems.append(f"`{name}` is {stored} in the model, {entry['dtype']} in the metadata")
        elif name not in produced:
            problems.append(f"`{name}` is listed in the metadata but is not in the model")
            continue
        for key, tensor_key in (("scale", "scale_tensor"), ("zero_point", "zero_point_tensor")):
            tensor_name = entry[tensor_key]
            if tensor_name is None:
                continue
            if tensor_name not in initializers:
                problems.append(f"`{tensor_name}` ({key} of `{name}`) is not an initializer of the model")
                continue
            stored = numpy_helper.to_array(initializers[tensor_name]).astype(np.float64).reshape(-1)
            if not np.array_equal(stored, np.asarray(entry[key], np.float64)):
                problems.append(f"`{tensor_name}` holds other numbers than the metadata's {key} of `{name}`")


def _inputs(qparams: dict[str, Any]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = []
    for meta in qparams["inputs"]:
        shape = [d if isinstance(d, int) else 1 for d in meta["shape"]]
        dtype = _NUMPY.get(meta["dtype"], np.float32)
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif meta["name"] == "attention_mask" or dtype == np.bool_:
            arrays.append(np.ones(shape, dtype))
        else:
            arrays.append(rng.integers(0, 2, shape).astype(dtype))  # token ids: 0 and 1 exist in every vocabulary
    return arrays


def verify_artifact(path: str | os.PathLike[str]) -> VerifyReport:
    """Re-check ``path`` (an exported ``.onnx``) against ``<name>.qparams.json`` (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise QATError(f"model `{path}` does not exist")
    qparams = read_qparams(sidecar_path(path))
    report = VerifyReport(path, qparams)
    if sha256(path) != qparams["model"]["sha256"]:
        report.problems.append(f"`{path.name}` is not the file the metadata describes (sha256 differs)")
    try:
        model = onnx.load(str(path))
    except Exception as error:
        raise QATError(f"`{path}` is not a readable ONNX model: {error}") from None
    _check_tensors(model, qparams, report.problems)
    config = qparams["model"].get("session_config", {})

    try:
        session = ort.InferenceSession(str(path), kernels.session_options(config), providers=["CPUExecutionProvider"])
        outputs = run_session(session, _inputs(qparams))
    except Exception as error:
        report.problems.append(f"ONNX Runtime cannot run `{path.name}`: {error}")
        return report
    for output, meta in zip(outputs, qparams["outputs"], strict=False):
        fixed = [d for d in meta["shape"] if isinstance(d, int)]
        if len(fixed) == len(meta["shape"]) and list(output.shape) != meta["shape"]:
            report.problems.append(f"output `{meta['name']}` has shape {list(output.shape)}, the metadata says {meta['shape']}")
        if np.issubdtype(output.dtype, np.floating) and not np.isfinite(output).all():
            report.problems.append(f"output `{meta['name']}` is not finite")
    report.kernels = kernels.kernel_report(path, layer_weights(qparams), config).layers
    for layer, kernel in report.kernels.items():
        recorded = qparams["layers"][layer]["kernel"]
        if recorded is not None and kernel != recorded:
            report.problems.append(f"layer `{layer}` runs on {kernel} here, on {recorded} at export")
    return report
