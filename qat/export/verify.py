"""`qat verify`: re-check an exported model against its calibration metadata.

What a device team runs before shipping a pair of files it received, without PyTorch:

1. the sidecar passes :func:`qat.export.sidecar.validate` (JSON Schema and cross-field rules), and
   its ``sha256`` is the model file's;
2. the graph and the sidecar describe the same quantization: every quantized tensor of the graph
   (the integer input of a DequantizeLinear, MatMulNBits or GatherBlockQuantized that is an
   initializer or a QuantizeLinear output) has an entry and every entry is such a tensor; each
   entry's dtype, shape, axis, block size, scale and zero-point initializers (names and numbers)
   are the graph's; the graph's scales are finite and positive, its zero points and weight codes
   lie in ``[qmin, qmax]``;
3. ONNX Runtime loads the model with the recorded session options and runs it on inputs of the
   recorded sizes, giving finite outputs of the recorded sizes;
4. the kernel each layer runs on is the one recorded at export (a different ORT build may fuse
   less).

What this cannot prove: that the numbers are the trained model's. Someone who changes the weights
(or scales) in the graph and writes the matching sidecar with a recomputed hash produces a pair
that is consistent and wrong. With the PyTorch model at hand, :func:`verify_against_model` closes
that gap: it runs the model and the file on the same inputs and compares them as the export does.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from qat.errors import QATError
from qat.export import ort_kernels
from qat.export.parity import Parity, compare, run_session
from qat.export.sidecar import is_reference, layer_weights, load_onnx, read_qparams, sha256, sidecar_path

_NUMPY = {"float": np.float32, "float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
          "bool": np.bool_, "uint8": np.uint8, "int8": np.int8}
TOKEN_IDS = 8
"""Integer inputs (token ids) are drawn from ``0..TOKEN_IDS-1``: ids that every vocabulary has."""
_DEQUANTIZERS = {("DequantizeLinear", ""): (0, 1), ("GatherBlockQuantized", "com.microsoft"): (0, 2),
                 ("MatMulNBits", "com.microsoft"): (1, 2)}
"""Operator → (index of its integer input, index of its scale; the zero point follows the scale)."""


@dataclass
class VerifyReport:
    """What :func:`verify_artifact` found; ``problems`` is empty when the pair is consistent."""

    path: Path
    qparams: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)
    parity: Parity | None = None
    """ONNX Runtime against the PyTorch model (:func:`verify_against_model`); None when not checked."""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Use:
    """One quantized tensor as a dequantizing node of the graph reads it."""

    node: onnx.NodeProto
    scale: str
    zero_point: str | None
    quantize: onnx.NodeProto | None


def _type_name(data_type: int) -> str:
    return onnx.TensorProto.DataType.Name(data_type).lower()


def _quantized_uses(model: onnx.ModelProto) -> tuple[dict[str, list[_Use]], dict[str, onnx.NodeProto]]:
    """Every quantized tensor of the graph by name, with the nodes that dequantize it; and the
    QuantizeLinear that writes each activation's codes."""
    initializers = {t.name for t in model.graph.initializer}
    quantize_of = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")}
    uses: dict[str, list[_Use]] = {}
    for node in model.graph.node:
        where = _DEQUANTIZERS.get((node.op_type, "" if node.domain == "ai.onnx" else node.domain))
        if where is None or len(node.input) <= where[1]:
            continue
        name = node.input[where[0]]
        if name in initializers or name in quantize_of:
            zero_point = node.input[where[1] + 1] if len(node.input) > where[1] + 1 and node.input[where[1] + 1] else None
            uses.setdefault(name, []).append(_Use(node, node.input[where[1]], zero_point, quantize_of.get(name)))
    for name in quantize_of:  # a QuantizeLinear whose codes nothing dequantizes is still a quantized tensor
        uses.setdefault(name, [])
    return uses, quantize_of


def _attribute(node: onnx.NodeProto, name: str) -> int | None:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _graph_dtype(name: str, initializers: dict[str, onnx.TensorProto], quantize: onnx.NodeProto | None) -> str | None:
    """The integer type of a quantized tensor: its initializer's, or what its QuantizeLinear writes."""
    if name in initializers:
        return _type_name(initializers[name].data_type)
    if quantize is None:
        return None
    if len(quantize.input) > 2 and quantize.input[2] in initializers:
        return _type_name(initializers[quantize.input[2]].data_type)
    output_dtype = _attribute(quantize, "output_dtype")
    return _type_name(output_dtype) if output_dtype else "uint8"


def _numbers_problems(name: str, key: str, tensor: onnx.TensorProto | None, recorded: Any, entry: dict[str, Any]) -> Iterator[str]:
    """Compare one scale / zero-point initializer with the entry's numbers (inline or by reference)."""
    if tensor is None:
        if recorded is not None and (is_reference(recorded) or any(recorded)):
            yield f"`{name}` has no {key} input in the model, the metadata records {key}s"
        return
    array = numpy_helper.to_array(tensor)
    if key == "scale" and list(array.shape) != entry["scale_shape"]:
        yield f"`{tensor.name}` (scale of `{name}`) has shape {list(array.shape)}, the metadata's scale_shape is {entry['scale_shape']}"
    if is_reference(recorded):
        if array.size != recorded["count"]:
            yield f"`{tensor.name}` ({key} of `{name}`) holds {array.size} numbers, the metadata refers to {recorded['count']}"
    elif not np.array_equal(array.astype(np.float64).reshape(-1), np.asarray(recorded, np.float64)):
        yield f"`{tensor.name}` holds other numbers than the metadata's {key} of `{name}`"
    if key == "scale" and not (np.isfinite(array).all() and (array > 0).all()):
        yield f"`{tensor.name}` (scale of `{name}`) holds scales that are not finite and positive"
    if key == "zero_point" and array.size and (array.min() < entry["qmin"] or array.max() > entry["qmax"]):
        yield f"`{tensor.name}` (zero point of `{name}`) holds values outside [qmin, qmax] = [{entry['qmin']}, {entry['qmax']}]"


def _use_problems(name: str, entry: dict[str, Any], use: _Use, initializers: dict[str, onnx.TensorProto]) -> Iterator[str]:
    node = use.node
    static = use.scale in initializers
    if static == entry["dynamic"]:
        graph, recorded = ("static", "dynamic (per-token)") if static else ("dynamic (per-token)", "static")
        yield f"`{name}` has a {graph} scale in the model, a {recorded} one in the metadata"
        return
    # a hard gate of an ort artifact reads its codes at another scale than they are written at (the
    # entry's dequantize_scale): the QuantizeLinear's scale is then the entry's scale
    read_scale = entry.get("dequantize_scale_tensor", entry["scale_tensor"])
    if use.quantize is not None and "dequantize_scale_tensor" in entry:
        if use.quantize.input[1] != entry["scale_tensor"]:
            yield (f"`{name}`: its QuantizeLinear's scale is `{use.quantize.input[1]}` in the model, "
                   f"`{entry['scale_tensor']}` in the metadata")
        else:
            yield from _numbers_problems(name, "scale", initializers[entry["scale_tensor"]], entry["scale"], entry)
    elif use.quantize is not None and (list(use.quantize.input[1:3]) != [use.scale, use.zero_point or ""][: len(use.quantize.input) - 1]):
        yield f"`{name}`: its QuantizeLinear and {node.op_type} read different scales or zero points"
    if use.zero_point is not None and use.zero_point != entry["zero_point_tensor"] and (static or entry["zero_point_tensor"]):
        yield f"`{name}`: its zero point is `{use.zero_point}` in the model, `{entry['zero_point_tensor']}` in the metadata"
    if not static:
        return
    if use.scale != read_scale:
        yield f"`{name}`: its scale is `{use.scale}` in the model, `{read_scale}` in the metadata"
        return
    block = _attribute(node, "block_size") or None
    if block != entry["block_size"]:
        yield f"`{name}` has block_size {block} in the model, {entry['block_size']} in the metadata"
    rank = len(initializers[name].dims) if name in initializers else len(entry["shape"] or [])
    if entry["scale_shape"] and entry["axis"] is not None and rank and node.op_type != "MatMulNBits":
        axis = _attribute(node, "quantize_axis" if node.op_type == "GatherBlockQuantized" else "axis")
        axis = 1 if axis is None else axis
        if axis % rank != entry["axis"] % rank:
            yield f"`{name}` has axis {axis} in the model, {entry['axis']} in the metadata"
    yield from _numbers_problems(name, "scale", initializers[use.scale], entry.get("dequantize_scale", entry["scale"]), entry)
    yield from _numbers_problems(name, "zero_point", initializers.get(use.zero_point) if use.zero_point else None,
                                 entry["zero_point"], entry)


def _weight_problems(name: str, entry: dict[str, Any], tensor: onnx.TensorProto) -> Iterator[str]:
    if tensor.data_type == onnx.TensorProto.UINT8 and entry["dtype"] in ("int4", "uint4"):
        return  # MatMulNBits packs two 4-bit codes per uint8 in its own blocked layout: elements are not codes
    if entry["shape"] is not None and list(tensor.dims) != entry["shape"]:
        yield f"`{name}` has shape {list(tensor.dims)} in the model, {entry['shape']} in the metadata"
    codes = numpy_helper.to_array(tensor)
    if codes.size and (codes.min() < entry["qmin"] or codes.max() > entry["qmax"]):
        yield f"`{name}` holds codes outside [qmin, qmax] = [{entry['qmin']}, {entry['qmax']}]"


def check_consistency(model: onnx.ModelProto, qparams: dict[str, Any]) -> list[str]:
    """Where the graph and the sidecar disagree about the quantization (module docstring, step 2), one line each."""
    initializers = {t.name: t for t in model.graph.initializer}
    uses, quantize_of = _quantized_uses(model)
    problems = [f"`{name}` is quantized in the model but has no entry in the metadata" for name in uses if name not in qparams["tensors"]]
    for name, entry in qparams["tensors"].items():
        if name not in uses:
            problems.append(f"`{name}` is listed in the metadata but is not a quantized tensor of the model")
            continue
        stored = _graph_dtype(name, initializers, quantize_of.get(name))
        if stored is not None and stored != entry["dtype"] and not _packed(stored, entry, uses[name]):
            problems.append(f"`{name}` is {stored} in the model, {entry['dtype']} in the metadata")
            continue
        if name in initializers:
            problems.extend(_weight_problems(name, entry, initializers[name]))
        for use in uses[name]:
            problems.extend(p for p in _use_problems(name, entry, use, initializers) if p not in problems)
    return problems


def _packed(stored: str, entry: dict[str, Any], uses: list[_Use]) -> bool:
    """A MatMulNBits weight: 4-bit codes packed into uint8, the width in the node's ``bits``."""
    return stored == "uint8" and any(_attribute(u.node, "bits") == int(entry["dtype"].removeprefix("u").removeprefix("int"))
                                     for u in uses if u.node.op_type == "MatMulNBits")


def _inputs(qparams: dict[str, Any]) -> list[np.ndarray]:
    """Seeded random inputs of the recorded sizes (free dimensions: 1); token ids below :data:`TOKEN_IDS`."""
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
            arrays.append(rng.integers(0, TOKEN_IDS, shape).astype(dtype))
    return arrays


def _session(path: Path, qparams: dict[str, Any]) -> ort.InferenceSession:
    config = qparams["model"].get("session_config", {})
    return ort.InferenceSession(str(path), ort_kernels.session_options(config), providers=["CPUExecutionProvider"])


def verify_artifact(path: str | os.PathLike[str], model: Any = None) -> VerifyReport:
    """Re-check ``path`` (an exported ``.onnx``) against ``<name>.qparams.json`` (module docstring).

    ``model``: the prepared PyTorch model the file was exported from (a QAT checkpoint loaded with
    :func:`qat.lightning.load_checkpoint`); when given, :func:`verify_against_model` runs too.
    """
    path = Path(path)
    if path.is_dir():
        raise QATError(f"`{path}` is a folder, not an ONNX model")
    if not path.is_file():
        raise QATError(f"model `{path}` does not exist")
    qparams = read_qparams(sidecar_path(path))
    report = VerifyReport(path, qparams)
    if sha256(path) != qparams["model"]["sha256"]:
        report.problems.append(f"`{path.name}` is not the file the metadata describes (sha256 differs)")
    report.problems.extend(check_consistency(load_onnx(path), qparams))
    config = qparams["model"].get("session_config", {})
    feeds = _inputs(qparams)
    try:
        outputs = run_session(_session(path, qparams), feeds)
    except Exception as error:
        report.problems.append(f"ONNX Runtime cannot run `{path.name}`: {error}")
        return report
    for output, meta in zip(outputs, qparams["outputs"], strict=False):
        fixed = [d for d in meta["shape"] if isinstance(d, int)]
        if len(fixed) == len(meta["shape"]) and list(output.shape) != meta["shape"]:
            report.problems.append(f"output `{meta['name']}` has shape {list(output.shape)}, the metadata says {meta['shape']}")
        if np.issubdtype(output.dtype, np.floating) and not np.isfinite(output).all():
            report.problems.append(f"output `{meta['name']}` is not finite")
    report.kernels = ort_kernels.kernel_report(path, layer_weights(qparams), config).layers
    for layer, kernel in report.kernels.items():
        recorded = qparams["layers"][layer]["kernel"]
        if recorded is not None and kernel != recorded:
            report.problems.append(f"layer `{layer}` runs on {kernel} here, on {recorded} at export")
    if model is not None:
        parity, problem = _against_model(path.name, qparams, feeds, outputs, model)
        report.parity = parity
        report.problems.extend([problem] if problem else [])
    return report


def _call(traced: Any, named: dict[str, Any]) -> Any:
    """Call the model as the export traced it: by keyword when its forward takes the graph's input names, else in order."""
    try:
        inspect.signature(traced.model.forward).bind(**named)
    except TypeError:
        return traced(*named.values())
    return traced(**named)


def verify_against_model(path: str | os.PathLike[str], model: Any) -> tuple[Parity | None, str | None]:
    """Run ``model`` (PyTorch) and ``path`` (ONNX Runtime) on seeded random inputs of the recorded sizes and compare them.

    The comparison is the export's own (:func:`qat.export.parity.compare` and
    :meth:`~qat.export.parity.Parity.failure`, with the sidecar's ``verification.rtol`` and
    ``min_top1``), so a pair that passes here is one the export would have written from this
    model. Changed weights or scales, even with a matching sidecar and hash, move the outputs
    beyond that tolerance.

    Args:
        path: an exported ``.onnx`` next to its sidecar.
        model: the prepared PyTorch model, with the checkpoint's weights loaded.

    Returns:
        The parity figures (None when an output is not finite), and the problem (one line) when
        ONNX Runtime differs too much or an output is not finite, else None.
    """
    path = Path(path)
    qparams = read_qparams(sidecar_path(path))
    feeds = _inputs(qparams)
    try:
        outputs = run_session(_session(path, qparams), feeds)
    except Exception as error:
        raise QATError(f"ONNX Runtime cannot run `{path.name}`: {error}") from None
    return _against_model(path.name, qparams, feeds, outputs, model)


def _against_model(name: str, qparams: dict[str, Any], feeds: list[np.ndarray], outputs: list[np.ndarray],
                   model: Any) -> tuple[Parity | None, str | None]:
    """:func:`verify_against_model` on ONNX Runtime's ``outputs`` for ``feeds``, already computed."""
    import torch

    from qat.export.exporter import TracedModel, numpy_leaves
    from qat.training.control import deployed_inference

    named = {meta["name"]: array for meta, array in zip(qparams["inputs"], feeds, strict=True)}
    traced = TracedModel(model).eval()
    try:
        with deployed_inference(model):
            reference = numpy_leaves(_call(traced, {key: torch.from_numpy(array) for key, array in named.items()}))
    except Exception as error:  # the model does not take the recorded inputs: another model than the file's
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QATError(f"{type(model).__name__} does not take the inputs `{name}` records "
                       f"({', '.join(named)}): {reason}; is it the model the file was exported from?") from None
    if len(outputs) != len(reference):
        raise QATError(f"`{name}` has {len(outputs)} outputs, the PyTorch model {len(reference)}: is it the model the file "
                       "was exported from?")
    try:
        measured = compare([outputs], [reference], [named], traced.output_kind)
    except QATError as error:  # a non-finite output on either side: the pair fails, it is no input error
        return None, f"{error}; the file does not compute what this checkpoint does"
    check = qparams["verification"]
    failure = measured.failure(check["rtol"], check.get("min_top1"))
    if failure is None:
        return measured, None
    return measured, f"ONNX Runtime differs from the PyTorch model: {failure}; the file does not compute what this checkpoint does"
