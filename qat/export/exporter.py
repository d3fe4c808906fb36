"""`qat.export_onnx`: a prepared, calibrated model → verified ONNX artifacts plus calibration metadata.

The steps, each a small pass:

1. trace with ``torch.onnx.export(dynamo=True)`` inside :func:`qat.exporting` and
   :func:`qat.deployed` (observers off, every quantizer on, whatever the schedule's phase), so
   every fake-quant becomes the ``qat::fake_quantize`` op, lowered by
   :data:`qat.export.qdq.CUSTOM_TRANSLATION_TABLE` to QuantizeLinear/DequantizeLinear (opset 21).
   Input sizes are the example inputs' (the batch may be left dynamic). Folded Conv+BatchNorm
   layers trace in their deployed form: one Conv with the folded weight and bias. Hugging Face
   models are traced without a KV cache and export their logits only;
2. fold constants (the BatchNorm folding arithmetic becomes a constant weight) and drop dead nodes;
3. :func:`qat.export.weights.lower_weights`: integer initializers (int4 packed two per byte, int8)
   in place of float weights and their QuantizeLinear;
4. :func:`qat.export.names.name_quantized_tensors`: stable names (``conv1.weight_quantized``…);
5. per artifact: *device* is that graph; *ort* is rewritten by :mod:`qat.export.ort_layout` for
   ONNX Runtime's integer kernels;
6. each artifact is written to a temporary file, run in ONNX Runtime against the PyTorch model
   (:mod:`qat.export.parity`), its optimized graph read for the kernels each layer runs on
   (:mod:`qat.export.ort_kernels`), and its sidecar built and validated (:mod:`qat.export.sidecar`).
   Only when every artifact passed are the files renamed into place: a failed export leaves
   nothing behind and no earlier file touched.

Before any of this (in well under a second), the export refuses what cannot work: a path it
cannot write (:func:`check_write_target`: the suffix, the folder, a folder in the way of a file,
a folder where no file can be created, such as ``/proc`` or ``/sys``), a model that is not
prepared or not calibrated, and a model whose parameters or buffers hold NaN or Inf
(:func:`check_finite_state`), which would export as a graph computing garbage.

**The artifact set is written as a unit.** The four files (``net.onnx``, ``net.ort.onnx`` and
their sidecars ``net.qparams.json``, ``net.ort.qparams.json``) are first all written to
temporaries beside them (``.net.onnx.<pid>.tmp`` …) and fsync'd; then renamed in this order:
the models (device, then ort), then the sidecars (device, then ort); then the folder is fsync'd.
A sidecar records its model's sha256, so it is the commit record of its pair: until the last
sidecar is renamed, at least one model of the set is not the file its sidecar describes (or has no
sidecar yet), and ``qat verify`` on the set names it (``sha256 differs``). A process killed
between two renames therefore leaves a set that verification rejects, never one that passes
while mixing two exports; it also leaves its remaining temporaries, which the next export to the
same path removes (with a logged warning) before writing. A rename that fails with an error
removes the temporaries not yet renamed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from qat import atomic
from qat.core.bias import BiasQuantizer
from qat.core.fake_quant import exporting
from qat.core.gate import GateQuantizer
from qat.core.observers import Observer
from qat.core.quantizer import Quantizer
from qat.errors import QATError
from qat.export import diagnose, ort_kernels, ort_layout, parity, sidecar
from qat.export.names import find_quantized_tensors, layer_inputs, name_quantized_tensors, rename_outputs
from qat.export.qdq import CUSTOM_TRANSLATION_TABLE, OPSET
from qat.export.weights import lower_weights
from qat.modules import QuantizedLayer
from qat.preparation.prepare import is_prepared
from qat.training.control import deployed, deployed_inference, quantizers

ARTIFACTS = ("device", "ort")
DEFAULT_RTOL = 0.05
"""Verification tolerance: the largest ONNX Runtime vs PyTorch difference allowed, relative to the
largest output magnitude. ORT's fused integer kernels round differently from the float Q/DQ
reference, which can move a value by a quantization step of an intermediate tensor."""

_log = logging.getLogger(__name__)


class FloatFallbackWarning(UserWarning):
    """Layers of the *ort* artifact that ONNX Runtime runs in float instead of an integer kernel."""


@dataclass(frozen=True)
class Artifact:
    """One verified ONNX file and its sidecar."""

    kind: str
    """``device`` (true int4, smallest) or ``ort`` (laid out for ONNX Runtime's integer kernels)."""
    path: Path
    qparams_path: Path
    bytes: int
    integer_weights: list[str]
    kernels: dict[str, str]
    """Layer → the ONNX Runtime kernel it runs on (``float Conv`` when it fell back to float)."""
    parity: parity.Parity
    session_config: dict[str, str] = field(default_factory=dict)

    @property
    def float_fallback(self) -> list[str]:
        return ort_kernels.float_fallback(self.kernels)

    @property
    def integer_kernel_share(self) -> float:
        """The share of the quantized layers that ONNX Runtime runs on an integer kernel (0 without layers)."""
        return ort_kernels.integer_share(self.kernels)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote. The top-level figures are the first artifact's."""

    artifacts: dict[str, Artifact]

    @property
    def first(self) -> Artifact:
        return next(iter(self.artifacts.values()))

    @property
    def device(self) -> Artifact | None:
        return self.artifacts.get("device")

    @property
    def ort(self) -> Artifact | None:
        return self.artifacts.get("ort")

    @property
    def path(self) -> Path:
        return self.first.path

    @property
    def bytes(self) -> int:
        return self.first.bytes

    @property
    def integer_weights(self) -> list[str]:
        return self.first.integer_weights

    @property
    def max_abs_diff(self) -> float:
        return self.first.parity.max_abs_diff

    @property
    def output_scale(self) -> float:
        return self.first.parity.output_scale

    @property
    def top1_agreement(self) -> float | None:
        return self.first.parity.top1_agreement


class TracedModel(nn.Module):
    """What is traced: the model, with Hugging Face outputs reduced to their logits and no KV cache.

    ``output_kind`` tells the parity check how to judge the first output
    (:data:`qat.export.parity.OUTPUT_KINDS`): ``logits`` (language-model next-token logits,
    checked by perplexity) is found from a ``ModelOutput`` with ``logits``, or declared by the
    model's ``returns_logits = True`` attribute (a LightningModule that returns the logits tensor
    itself, as :class:`qat.app.tasks.CausalLanguageModel` does); ``embeddings`` (one vector per row,
    checked by per-row distance and cosine) by ``returns_embeddings = True``
    (:class:`qat.app.tasks.SentenceEmbeddingDistillation`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.no_cache = _is_hf(model) and _accepts(model, "use_cache")
        self.output_kind = ("logits" if getattr(model, "returns_logits", False) is True
                            else "embeddings" if getattr(model, "returns_embeddings", False) is True else None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.no_cache:
            kwargs = {**kwargs, "use_cache": False}
        out = self.model(*args, **kwargs)
        if isinstance(out, Mapping) and "logits" in out:  # transformers' ModelOutput
            self.output_kind = "logits"
            return out["logits"]
        return out


def _is_hf(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("transformers.") and hasattr(m, "config") for m in model.modules())


def _accepts(model: nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


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
        if not q.calibrated:
            raise QATError(f"quantizer `{name}` was never calibrated: run forward passes with observers on (or load a QAT "
                           "checkpoint) before exporting")


def _non_finite(tensor: Tensor, infinity_allowed: bool = False) -> str | None:
    """``NaN (3 of 8 values)`` when a float ``tensor`` holds NaN or ±Inf (unless allowed), else None."""
    if not tensor.is_floating_point():
        return None
    inf = 0 if infinity_allowed else int(torch.isinf(tensor).sum())
    return parity.describe_non_finite(int(torch.isnan(tensor).sum()), inf, tensor.numel())


def check_finite_state(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN or Inf, naming the first such tensor.

    Parameters (and quantizer scales and zero points) must be finite: a non-finite one means
    training diverged. A BatchNorm's running statistics turn NaN for good after one training
    forward on a batch with a NaN (the quantizers' scales stay finite: observers skip non-finite
    values), and the folded Conv then computes NaN. Other buffers must hold no NaN; an infinity
    there may be meant (an additive attention mask of ``-inf``). Observer statistics are left out:
    their range starts as ``+inf, -inf`` and only the scales computed from it enter the graph."""
    modules = dict(model.named_modules())
    found = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        if isinstance(owner, Observer):
            continue
        infinity_allowed = False
        if isinstance(owner, nn.modules.batchnorm._BatchNorm) and leaf in ("running_mean", "running_var"):
            reason = ("a non-finite batch reached BatchNorm during training; load a checkpoint from before it, or keep such "
                      "batches out of training")
        elif isinstance(tensor, nn.Parameter) or isinstance(owner, Quantizer):
            reason = "training diverged; load a checkpoint from before it, or train with a lower learning rate"
        else:  # another buffer: an infinity there may be meant (a mask), NaN never is
            reason, infinity_allowed = "the exported graph would compute with it", True
        bad = _non_finite(tensor.detach(), infinity_allowed)
        if bad is None:
            continue
        found.append((name, f"`{name}` holds {bad}: {reason}"))
    if found:
        others = ", ".join(f"`{name}`" for name, _ in found[1:4]) + (", …" if len(found) > 4 else "")
        raise QATError(f"cannot export {type(model).__name__}: {found[0][1]}" + (f" (also non-finite: {others})" if others else ""))


def _check_not_empty(batches: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    """Refuse an input tensor without elements (a batch of 0 samples): there is nothing to trace or verify on."""
    for i, (args, kwargs) in enumerate(batches):
        named = [*((f"input {j}", a) for j, a in enumerate(args)), *((f"`{k}`", v) for k, v in kwargs.items())]
        for name, value in named:
            if isinstance(value, Tensor) and value.numel() == 0:
                where = "example_inputs" if i == 0 else f"verification_inputs[{i - 1}]"
                raise QATError(f"{where}: {name} has no elements (shape {tuple(value.shape)}); give at least one sample")


def _u8s8_layers(model: nn.Module) -> list[str]:
    """Layers with 8-bit weights and unsigned 8-bit inputs: ONNX Runtime runs them as u8·s8
    integer kernels, whose 16-bit intermediate sums saturate on x86 CPUs without VNNI."""
    return [name for name, layer in model.named_modules()
            if isinstance(layer, QuantizedLayer) and layer.weight_quantizer is not None and layer.input_quantizer is not None
            and layer.weight_quantizer.spec.bits == 8 and layer.input_quantizer.spec.bits == 8
            and not layer.input_quantizer.spec.signed]


def numpy_leaves(value: Any) -> list[np.ndarray]:
    """The tensors of a (nested) model output or input as numpy arrays, on the CPU; bfloat16 as float32."""
    return [t.detach().cpu().numpy() if t.dtype != torch.bfloat16 else t.detach().float().cpu().numpy()
            for t in tree_leaves(value) if isinstance(t, Tensor)]


def check_write_target(path: str | os.PathLike[str], artifacts: Sequence[str] = ARTIFACTS) -> Path:
    """The device artifact's ``path``, checked before any work: every file of the artifact set can be
    written there. Raises :class:`QATError` in one line otherwise: a suffix other than ``.onnx``, a
    folder that does not exist or is not a folder, a folder in the place of one of the files, a
    folder where no file can be created (probed by creating one, since the permission bits do not
    tell for root, nor for ``/proc`` and ``/sys``).

    Example:
        >>> check_write_target("no-such-folder/net.onnx")
        Traceback (most recent call last):
        ...
        qat.errors.QATError: cannot write `no-such-folder/net.onnx`: the folder `no-such-folder` does not exist
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise QATError(f"export path `{path}` must end in .onnx")
    folder = path.parent
    if not folder.exists():
        raise QATError(f"cannot write `{path}`: the folder `{folder}` does not exist")
    if not folder.is_dir():
        raise QATError(f"cannot write `{path}`: `{folder}` is not a folder")
    for member in artifact_files(path, artifacts):
        if member.is_dir():
            raise QATError(f"cannot write `{path}`: `{member}` is a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise QATError(f"cannot write `{path}`: the folder `{folder}` is not writable ({error.strerror or error})") from None
    return path


def artifact_path(path: Path, kind: str) -> Path:
    """``model.onnx`` for the device artifact, ``model.ort.onnx`` for the ort artifact."""
    return path if kind == "device" else path.with_name(f"{path.stem}.{kind}.onnx")


def artifact_files(path: Path, artifacts: Sequence[str] = ARTIFACTS) -> list[Path]:
    """The files of an export to ``path``: each artifact's model, then each one's sidecar (the rename order)."""
    models = [artifact_path(path, kind) for kind in dict.fromkeys(artifacts)]
    return [*models, *map(sidecar.sidecar_path, models)]


def _dynamic_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
    batch = torch.export.Dim("batch")

    def spec(value: Any) -> Any:
        return {0: batch} if isinstance(value, Tensor) and value.ndim > 0 else None

    return {name: spec(v) for name, v in kwargs.items()} if kwargs else {"args": tuple(spec(v) for v in args)}


@contextlib.contextmanager
def _quiet_constant_folding() -> Iterator[None]:
    """Silence onnxscript's constant folder, which logs ``Evaluation failed: …`` at WARNING level
    when its reference evaluator cannot run a node ahead of time (a BERT attention-mask Reshape
    whose shape it sees as 1 element): the node just stays in the graph, nothing is wrong."""
    logger = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _named_quantizers(model: nn.Module) -> Iterator[None]:
    """Give every quantizer of ``model`` (bias quantizers included) its module path as
    :attr:`~qat.core.quantizer.Quantizer.export_name` while tracing: the fake-quantize op carries it
    into the graph, where it names the quantizer's tensors (:mod:`qat.export.names`). Each
    quantizer's own value is put back afterwards."""
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, Quantizer | BiasQuantizer | GateQuantizer)]
    own = [vars(q).get("export_name") for _, q in named]
    try:
        for name, q in named:
            q.export_name = name
        yield
    finally:
        for (_, q), previous in zip(named, own, strict=True):
            if previous is None:
                del q.export_name
            else:
                q.export_name = previous


def _trace(traced: TracedModel, args: tuple[Any, ...], kwargs: dict[str, Any], *, opset: int, dynamic_batch: bool,
           input_names: list[str] | None) -> ir.Model:
    try:
        with deployed(traced.model), torch.no_grad(), exporting(), _named_quantizers(traced.model), _quiet_constant_folding():
            program = torch.onnx.export(traced, args, kwargs=kwargs or None, dynamo=True, verbose=False, opset_version=opset,
                                        input_names=input_names, custom_translation_table=CUSTOM_TRANSLATION_TABLE,
                                        dynamic_shapes=_dynamic_batch(args, kwargs) if dynamic_batch else None)
    except QATError:
        raise
    except Exception as error:
        raise QATError(f"torch.onnx.export failed for {type(traced.model).__name__}: {_export_failure(error)}") from error
    model = program.model
    with _quiet_constant_folding():
        onnxscript.optimizer.fold_constants(model, input_size_limit=1 << 30, output_size_limit=1 << 30)
    lower_weights(model)
    onnxscript.optimizer.remove_unused_nodes(model)
    return model


def _export_failure(error: BaseException) -> str:
    """The useful part of the exporter's error chain: the operator it could not convert and why.

    The outer errors are generic advice; the node being translated and the innermost reason are
    further down the ``__cause__`` chain."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    node = next((m for e in chain if (m := re.search(r"call_function\[target=([\w.]+)\]", str(e)))), None)
    reason = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
    where = f"the operator `{node.group(1)}` has no ONNX conversion ({reason})" if node else f"{type(chain[-1]).__name__}: {reason}"
    return f"{where}; replace that operation in the model's forward"


def _input_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str] | None:
    """Graph input names: the keyword names, or the forward's parameter names for positional inputs."""
    if kwargs:
        return None  # the exporter names keyword inputs after their keys
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[: len(args)] if len(names) >= len(args) else None


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    artifacts: Sequence[str] = ARTIFACTS,
    verification_inputs: Sequence[Any] = (),
    dynamic_batch: bool = False,
    output_names: list[str] | None = None,
    normalization: dict[str, list[float]] | None = None,
    opset: int = OPSET,
    rtol: float = DEFAULT_RTOL,
    min_top1: float | None = None,
    verbose: bool = False,
) -> ExportResult:
    """Export a prepared, calibrated model to verified ONNX artifacts with calibration metadata.

    Writes, for ``path = "net.onnx"``: ``net.onnx`` + ``net.qparams.json`` (*device*: true int4
    weights, the smallest file) and ``net.ort.onnx`` + ``net.ort.qparams.json`` (*ort*: the same
    numbers laid out for ONNX Runtime's integer kernels). Each is verified in ONNX Runtime.

    Args:
        model: a model prepared with :func:`qat.prepare` whose quantizers have observed data.
        example_inputs: a tensor, a tuple of positional arguments, or a mapping of keyword
            arguments (``{"input_ids": …, "attention_mask": …}`` for a language model); the
            graph has these input sizes.
        path: the device artifact's ``.onnx`` path; the others are named after it.
        artifacts: which artifacts to write (``device``, ``ort``).
        verification_inputs: more inputs of the same structure (a calibration batch) to
            verify on, besides ``example_inputs``.
        dynamic_batch: leave the first dimension of every input free.
        output_names: graph output names (default ``output``, or ``output_0``, ``output_1``…).
        normalization: ``{"mean": […], "std": […]}`` the inputs expect, recorded in the sidecar.
        opset: ONNX opset (21 or later: int4 and blocked Q/DQ).
        rtol: allowed ORT vs PyTorch difference, relative to the largest output magnitude (for a
            model with ``returns_embeddings = True``: the mean distance between the two
            embeddings of a row, relative to PyTorch's embedding length).
        min_top1: for a classifier (2-D outputs), the least share of rows on which ONNX Runtime
            picks PyTorch's top-1 class; default ``1 − 2·rtol``
            (:func:`qat.export.parity.min_top1_for`).
        verbose: print a table of parity and kernels per artifact.

    Example:
        >>> import torch, qat, tempfile, pathlib
        >>> model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
        ...                     {"weight": {"bits": 4}})
        >>> _ = model(torch.randn(32, 16))  # calibrate
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "mlp.onnx"
        >>> result = qat.export_onnx(model, torch.randn(8, 16), out)
        >>> result.integer_weights, result.top1_agreement
        (['0.weight_quantized', '2.weight_quantized'], 1.0)
        >>> sorted(p.name for p in out.parent.iterdir())
        ['mlp.onnx', 'mlp.ort.onnx', 'mlp.ort.qparams.json', 'mlp.qparams.json']
    """
    unknown = [a for a in artifacts if a not in ARTIFACTS]
    if unknown or not artifacts:
        raise QATError(f"artifacts: `{unknown or list(artifacts)}` is not a non-empty subset of {list(ARTIFACTS)}")
    if not (isinstance(rtol, int | float) and math.isfinite(rtol) and rtol >= 0):
        raise QATError(f"rtol: must be a finite number ≥ 0; got `{rtol!r}`")
    if min_top1 is not None and not (isinstance(min_top1, int | float) and 0 <= min_top1 <= 1):
        raise QATError(f"min_top1: must be a number in [0, 1] or None; got `{min_top1!r}`")
    target = check_write_target(path, artifacts)
    _check_calibrated(model)
    check_finite_state(model)
    removed = atomic.remove_leftovers(artifact_files(target))
    if removed:
        _log.warning("removed %d temporary files an interrupted export left in `%s`: %s", len(removed), target.parent,
                     ", ".join(p.name for p in removed))
    args, kwargs = _split_inputs(example_inputs)
    batches = [(args, kwargs)] + [_split_inputs(extra) for extra in verification_inputs]
    _check_not_empty(batches)
    traced = TracedModel(model).eval()
    with deployed_inference(model):
        references = [numpy_leaves(traced(*a, **k)) for a, k in batches]
        graph = _trace(traced, args, kwargs, opset=opset, dynamic_batch=dynamic_batch, input_names=_input_names(model, args, kwargs))
    name_quantized_tensors(graph)
    rename_outputs(graph, output_names)
    order = [value.name for value in graph.graph.inputs]
    # keyword inputs in the graph's order, whatever order the mapping had
    feeds = [numpy_leaves([k[name] for name in order if name in k]) if k else numpy_leaves(a) for a, k in batches]

    def batch_codes(index: int, forced: dict[str, np.ndarray] | None = None) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        a, k = batches[index]
        outputs: list[list[np.ndarray]] = []
        with deployed_inference(model):
            codes = diagnose.activation_codes(model, lambda: outputs.append(numpy_leaves(traced(*a, **k))), forced=forced)
        return outputs[0], codes

    def batch_noise(index: int) -> list[np.ndarray] | None:
        a, k = batches[index]
        generator = torch.Generator().manual_seed(index)
        if not any(isinstance(v, Tensor) and v.is_floating_point() for v in tree_leaves((a, k))):
            return None
        with deployed_inference(model):
            return numpy_leaves(traced(*[diagnose.perturbed(v, generator) for v in a],
                                       **{key: diagnose.perturbed(v, generator) for key, v in k.items()}))

    reference = _Reference(feeds, references, traced.output_kind, rtol, min_top1, batch_codes, batch_noise)
    models: list[tuple[Path, Path]] = []  # (temporary, final), in the order of artifact_files
    sidecars: list[tuple[Path, Path]] = []
    written: dict[str, Artifact] = {}
    try:
        for kind in dict.fromkeys(artifacts):
            artifact, temporary, qparams = _build(kind, graph, model, target, reference, normalization)
            models.append((temporary, artifact.path))
            written[kind] = artifact
            sidecars.append((atomic.write_temporary(artifact.qparams_path, sidecar.to_json(qparams)), artifact.qparams_path))
        atomic.replace_all(models + sidecars)  # models first, sidecars last: see the module docstring
    finally:
        for temporary, _ in models + sidecars:
            temporary.unlink(missing_ok=True)
    result = ExportResult(written)
    _warn_fallback(result)
    if verbose:
        print_report(result)
    return result


@dataclass(frozen=True)
class _Reference:
    """What every artifact is verified against: PyTorch's outputs on the verification inputs."""

    feeds: list[list[np.ndarray]]
    """Each batch's inputs, in the graph's order."""
    outputs: list[list[np.ndarray]]
    output_kind: str | None
    rtol: float
    min_top1: float | None
    activation_codes: Callable[[int, dict[str, np.ndarray] | None], tuple[list[np.ndarray], dict[str, np.ndarray]]]
    """PyTorch's outputs and activation codes on one batch, fed the given codes where there are some
    (:func:`qat.export.diagnose.activation_codes`), for a failure's diagnosis."""
    noise: Callable[[int], list[np.ndarray] | None]
    """PyTorch's outputs on one batch with its float inputs moved by :data:`qat.export.diagnose.NOISE`, for a failure's diagnosis."""


def _build(kind: str, graph: ir.Model, model: nn.Module, target: Path, reference: _Reference,
           normalization: dict[str, list[float]] | None):
    """Lay out, save to a temporary file, verify and describe one artifact (nothing final is written)."""
    final = artifact_path(target, kind)
    config: dict[str, str] = {}
    graph = ir.serde.deserialize_model(ir.serde.serialize_model(graph))  # each artifact rewrites its own copy
    tensors = find_quantized_tensors(graph.graph)
    if kind == "ort":
        ort_layout.widen_small_weights(tensors)
        ort_layout.widen_small_activations(tensors)
        if ort_layout.matmul_nbits_layout(tensors):
            config = dict(ort_layout.SESSION_CONFIG)
        ort_layout.gather_block_quantized(tensors)
        ort_layout.global_average_pool(graph.graph)
        modules = dict(model.named_modules())
        tensors += ort_layout.integer_gates([t for t in tensors if isinstance(modules.get(t.quantizer), GateQuantizer)])
        onnxscript.optimizer.remove_unused_nodes(graph)
    tensors = [t for t in tensors if t.dequantize.graph is not None]
    config.update(ort_layout.session_options_for(tensors, kind))
    entries = sidecar.describe_graph(model, graph, tensors, layer_inputs(tensors), normalization=normalization)
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        node.metadata_props.clear()  # the exporter's per-node trace (module path, stack): a third of a small model's bytes
    temporary = atomic.temporary_path(final)
    try:
        ir.save(graph, temporary)
        atomic.fsync_file(temporary)
        measured, report = _verify(temporary, final, kind, entries.layer_weights, reference, config, model)
        qparams = sidecar.build_qparams(
            entries,
            artifact={"file": final.name, "artifact": kind, "opset": graph.opset_imports.get("", OPSET),
                      "sha256": sidecar.sha256(temporary), "session_config": config},
            verification={"onnxruntime": ort.__version__, "providers": ["CPUExecutionProvider"],
                          **parity.to_dict(measured, reference.rtol, reference.min_top1), "kernels": report.counts,
                          "float_fallback": report.float_fallback},
            kernels=report.layers)
        sidecar.validate(qparams, f"{sidecar.sidecar_path(final)}")
        checked = Artifact(kind, final, sidecar.sidecar_path(final), temporary.stat().st_size, entries.integer_weights,
                           report.layers, measured, config)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return checked, temporary, qparams


def _verify(file: Path, final: Path, kind: str, layer_weights: dict[str, str], reference: _Reference, config: dict[str, str],
            model: nn.Module) -> tuple[parity.Parity, ort_kernels.KernelReport]:
    """Run ``file`` in ONNX Runtime on the reference's inputs against PyTorch's outputs and read the
    kernel each layer runs on; a QATError, with what explains it (:mod:`qat.export.diagnose`), when
    they differ beyond ``rtol``."""
    feeds, references = reference.feeds, reference.outputs
    try:
        session = ort.InferenceSession(str(file), ort_kernels.session_options(config), providers=["CPUExecutionProvider"])
        outputs = [parity.run_session(session, f) for f in feeds]
    except Exception as error:
        raise QATError(f"ONNX Runtime cannot run the {kind} artifact `{final}`: {error}") from error
    if len(outputs[0]) != len(references[0]):
        raise QATError(f"the ONNX model has {len(outputs[0])} outputs, the PyTorch model {len(references[0])}")
    names = [meta.name for meta in session.get_inputs()]
    named = [dict(zip(names, f, strict=True)) for f in feeds]
    output_names = [meta.name for meta in session.get_outputs()]

    def compare(got: list[list[np.ndarray]], batch: int | None = None) -> parity.Parity:
        """ORT's outputs ``got`` against PyTorch's, for every batch, or for the one batch ``batch``."""
        chosen = slice(None) if batch is None else slice(batch, batch + 1)
        return parity.compare(got, references[chosen], named[chosen], reference.output_kind, output_names)

    try:
        measured = compare(outputs)
    except QATError as error:  # a NaN or Inf output
        raise QATError(f"{error}; `{final}` was not written") from None
    failure = measured.failure(reference.rtol, reference.min_top1)
    if failure is not None:
        u8s8 = _u8s8_layers(model)
        hint = (f". Layers {', '.join(f'`{n}`' for n in u8s8[:4])} have 8-bit weights and uint8 inputs: ONNX Runtime "
                "runs them with u8·s8 kernels that saturate on x86 CPUs without VNNI. Use 7-bit weights (`weight: {bits: 7}`) "
                "or signed int8 inputs (`activation: {signed: true, symmetric: true}`)") if u8s8 else ""
        found = diagnose.diagnose(file, config, feeds, outputs, compare, reference.rtol, reference.min_top1,
                                  reference.activation_codes, reference.noise)
        explained = found.describe()
        raise QATError(f"ONNX Runtime differs from PyTorch in the {kind} artifact: {failure}; `{final}` was not written"
                       f"{hint}{'. ' + explained if explained else ''}")
    return measured, ort_kernels.kernel_report(file, layer_weights, config)


def _warn_fallback(result: ExportResult) -> None:
    artifact = result.ort
    if artifact is not None and artifact.float_fallback:
        layers = ", ".join(f"{layer} ({artifact.kernels[layer]})" for layer in artifact.float_fallback)
        warnings.warn(f"{len(artifact.float_fallback)} of {len(artifact.kernels)} quantized layers of `{artifact.path}` run in "
                      f"float in ONNX Runtime, not in an integer kernel: {layers}. See docs/guide/export.md, "
                      "'Which ONNX Runtime kernels run'.",
                      FloatFallbackWarning, stacklevel=3)


def print_report(result: ExportResult) -> None:
    """A table per artifact: file, size, parity and the kernel of each layer."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for artifact in result.artifacts.values():
        p = artifact.parity
        table = Table(title=f"{artifact.kind} artifact ({artifact.bytes / 1024:.1f} KiB)", caption=str(artifact.path))
        table.add_column("layer")
        table.add_column("ONNX Runtime kernel")
        for layer, kernel in artifact.kernels.items():
            table.add_row(layer, f"[red]{kernel}[/red]" if ort_kernels.runs_in_float(kernel) else kernel)
        console.print(table)
        extra = f", top-1 agreement {p.top1_agreement:.1%}" if p.top1_agreement is not None else ""
        if p.perplexity is not None:
            extra += f", perplexity {p.perplexity['torch']:.3f} → {p.perplexity['onnx']:.3f}"
        if p.embedding is not None:
            extra += f", embeddings {p.embedding['distance_mean']:.2%} apart on average, cosine ≥ {p.embedding['cosine_min']:.4f}"
        console.print(f"  max |ORT − PyTorch| {p.max_abs_diff:.3g} (largest output {p.output_scale:.3g}){extra}; "
                      f"{artifact.integer_kernel_share:.0%} of the layers on integer kernels; metadata {artifact.qparams_path}")


def load_session(path: str | os.PathLike[str]) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for an exported artifact, with the session options its sidecar records."""
    config = sidecar.read_qparams(sidecar.sidecar_path(path))["model"].get("session_config", {})
    return ort.InferenceSession(str(path), ort_kernels.session_options(config), providers=["CPUExecutionProvider"])


__all__ = ["ARTIFACTS", "Artifact", "ExportResult", "FloatFallbackWarning", "check_finite_state", "check_write_target", "export_onnx",
           "load_session"]
