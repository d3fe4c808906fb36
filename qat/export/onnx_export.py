"""`qat.export_onnx`: a prepared, calibrated model → an ONNX file with integer weights, verified in ONNX Runtime.

The steps, each a small pass:

1. trace with ``torch.onnx.export(dynamo=True)`` inside :func:`qat.exporting` and with observers
   off, so every fake-quant becomes the ``qat::fake_quantize`` op, lowered by
   :data:`qat.export.qdq.CUSTOM_TRANSLATION_TABLE` to QuantizeLinear/DequantizeLinear (opset 21).
   Folded Conv+BatchNorm layers trace in their deployed form: one Conv with the folded weight and
   bias;
2. fold constants (the BatchNorm folding arithmetic becomes a constant weight);
3. :func:`qat.export.weights.lower_weights`: integer initializers (int4 packed two per byte, int8)
   in place of float weights and their QuantizeLinear;
4. write to a temporary file, check it with ONNX Runtime against the PyTorch model on the example
   inputs, and only then rename it to ``path``: a failed export leaves no file behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from qat.control import evaluating, quantizers
from qat.errors import QATError
from qat.export.qdq import CUSTOM_TRANSLATION_TABLE, OPSET
from qat.export.weights import lower_weights
from qat.fake_quant import exporting
from qat.modules import QuantizedLayer
from qat.prepare import is_prepared

DEFAULT_RTOL = 0.05
"""Verification tolerance: the largest ONNX Runtime vs PyTorch difference allowed, relative to the
largest output magnitude. ORT's fused integer kernels round differently from the float Q/DQ
reference, which can move a value by a quantization step of an intermediate tensor."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how well ONNX Runtime reproduced PyTorch."""

    path: Path
    bytes: int
    integer_weights: list[str]
    max_abs_diff: float
    output_scale: float
    top1_agreement: float | None
    """Share of rows where ORT and PyTorch pick the same class (2-D outputs only)."""


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _check_calibrated(model: nn.Module) -> None:
    if not is_prepared(model):
        raise QATError(f"{type(model).__name__} is not prepared: call qat.prepare(model, recipe) and train or calibrate it first")
    for name, q in quantizers(model):
        if q.fake_quant_enabled and not q.calibrated:
            raise QATError(f"quantizer `{name}` was never calibrated: run forward passes with observers on (or load a QAT "
                           "checkpoint) before exporting")


def _u8s8_layers(model: nn.Module) -> list[str]:
    """Layers with 8-bit weights and unsigned 8-bit inputs: ONNX Runtime runs them as u8·s8
    integer kernels, whose 16-bit intermediate sums saturate on x86 CPUs without VNNI."""
    return [name for name, layer in model.named_modules()
            if isinstance(layer, QuantizedLayer) and layer.weight_quantizer is not None and layer.input_quantizer is not None
            and layer.weight_quantizer.spec.bits == 8 and layer.input_quantizer.spec.bits == 8
            and not layer.input_quantizer.spec.signed]


def _tensors(value: Any) -> list[np.ndarray]:
    return [t.detach().float().cpu().numpy() for t in tree_leaves(value) if isinstance(t, Tensor)]


def _write_target(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix != ".onnx":
        raise QATError(f"export path `{path}` must end in .onnx")
    if not path.parent.is_dir():
        raise QATError(f"cannot write `{path}`: the folder `{path.parent}` does not exist")
    if not os.access(path.parent, os.W_OK):
        raise QATError(f"cannot write `{path}`: the folder `{path.parent}` is not writable")
    return path


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = OPSET,
    rtol: float = DEFAULT_RTOL,
) -> ExportResult:
    """Export a prepared, calibrated model to ONNX with integer weights, verified in ONNX Runtime.

    Args:
        model: a model prepared with :func:`qat.prepare` whose quantizers have observed data.
        example_inputs: a tensor, a tuple of positional arguments, or a mapping of keyword
            arguments; the exported graph has these input shapes.
        path: the ``.onnx`` file to write (replaced only once verification passed).
        opset: ONNX opset (21 or later: int4 and blocked Q/DQ).
        rtol: allowed ORT vs PyTorch difference, relative to the largest output magnitude.

    Example:
        >>> import torch, qat, tempfile, pathlib
        >>> model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
        ...                     {"weight": {"bits": 4}})
        >>> _ = model(torch.randn(32, 16))  # calibrate
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "mlp.onnx"
        >>> result = qat.export_onnx(model, torch.randn(8, 16), out)
        >>> result.integer_weights, result.top1_agreement
        (['0.weight_quantized', '2.weight_quantized'], 1.0)
    """
    target = _write_target(path)
    _check_calibrated(model)
    args, kwargs = _split_inputs(example_inputs)
    training = model.training
    model.eval()
    try:
        with evaluating(model), torch.no_grad():
            reference = _tensors(model(*args, **kwargs))
            with exporting():
                program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, verbose=False,
                                            opset_version=opset, custom_translation_table=CUSTOM_TRANSLATION_TABLE)
    except QATError:
        raise
    except Exception as error:
        raise QATError(f"torch.onnx.export failed for {type(model).__name__}: {type(error).__name__}: {error}") from error
    finally:
        model.train(training)

    onnx_model = program.model
    onnxscript.optimizer.fold_constants(onnx_model, input_size_limit=1 << 30, output_size_limit=1 << 30)
    integer_weights = lower_weights(onnx_model)
    onnxscript.optimizer.remove_unused_nodes(onnx_model)

    temporary = target.with_name(f".{target.name}.tmp")
    try:
        ir.save(onnx_model, temporary)
        result = _verify(temporary, target, args, kwargs, reference, integer_weights, rtol, _u8s8_layers(model))
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return result


def _verify(file: Path, target: Path, args: tuple[Any, ...], kwargs: dict[str, Any], reference: list[np.ndarray],
            integer_weights: list[str], rtol: float, u8s8_layers: list[str]) -> ExportResult:
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    inputs = [t.detach().cpu().numpy() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
    feeds = {meta.name: value for meta, value in zip(session.get_inputs(), inputs, strict=True)}
    outputs = session.run(None, feeds)
    if len(outputs) != len(reference):
        raise QATError(f"the ONNX model has {len(outputs)} outputs, the PyTorch model {len(reference)}")
    max_abs_diff = max(float(np.abs(o.astype(np.float32) - r).max()) for o, r in zip(outputs, reference, strict=True))
    output_scale = max(float(np.abs(r).max()) for r in reference)
    first, first_ref = outputs[0], reference[0]
    top1 = float((first.argmax(-1) == first_ref.argmax(-1)).mean()) if first_ref.ndim == 2 else None
    if max_abs_diff > rtol * max(output_scale, 1e-12):
        hint = (f". Layers {', '.join(f'`{n}`' for n in u8s8_layers[:4])} have 8-bit weights and uint8 inputs: ONNX Runtime "
                "runs them with u8·s8 kernels that saturate on x86 CPUs without VNNI. Use 7-bit weights (`weight: {bits: 7}`) "
                "or signed int8 inputs (`activation: {signed: true, symmetric: true}`)") if u8s8_layers else ""
        raise QATError(f"ONNX Runtime differs from PyTorch by {max_abs_diff:.4g} (largest output {output_scale:.4g}, "
                       f"allowed {rtol:.0%}); `{target}` was not written{hint}")
    return ExportResult(target, file.stat().st_size, integer_weights, max_abs_diff, output_scale, top1)
