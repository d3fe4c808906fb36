"""Why ONNX Runtime and PyTorch differ: where they part, and which ONNX Runtime rewrite parts them.

When an artifact fails its parity check (:mod:`qat.export.parity`), the export explains the failure
with five measurements, each of which costs a session or a forward pass, so they run only then:

1. **The graph without ORT's optimizations** (``ORT_DISABLE_ALL``: every node run as written). If
   that is within tolerance, the graph computes what PyTorch does and one of ORT's graph rewrites
   changes the numbers;
2. **the rewrite that does it**: each rewrite of :data:`REWRITES` is turned off alone
   (``InferenceSession(..., disabled_optimizers=[name])``); the first whose absence brings the
   artifact within tolerance is named, with what to do about it where that is known
   (:data:`ADVICE`);
3. **PyTorch against itself**: the model run again with every float input moved by one part in a
   million (:data:`NOISE`). A quantized network is discontinuous: a value on a rounding boundary
   goes to one code or the next, and every layer after it spreads the flip. Where PyTorch alone
   moves about as far as ONNX Runtime does, float rounding explains the difference and no runtime
   can match the model more closely (deep untrained networks are the usual case);
4. **the first quantized tensor where the two part**: every static activation's integer codes (the
   output of its QuantizeLinear) are made graph outputs, ORT runs the artifact with its
   optimizations (fused kernels produce those codes directly), PyTorch's codes are read from the
   quantizers by forward hooks, and the first tensor in graph order whose codes differ is named,
   with the share of codes that differ and by how many steps. One step in a few codes is a rounding
   difference; many codes, or several steps, right after one layer point at that layer;
5. **PyTorch fed ORT's codes**: PyTorch runs again with every static activation quantizer
   returning ORT's codes instead of its own, so each quantized tensor is recomputed from the
   inputs ORT had. If every recomputed tensor is within one step of ORT's and the output then
   matches ORT's, every difference is a rounding flip at a code boundary that the network carries
   to its output (a small network can turn one flipped code into several percent of its output),
   and the graph computes what the model does; a wrong graph leaves tensors several steps apart.

Example: an export whose *ort* artifact fails reads ``… ONNX Runtime's codes first differ from
PyTorch's at `2.input_quantized` (the input of `2`): 48 of 64 (75.00%), by up to 128 steps. …
Without ORT's rewrite `WeightBiasQuantization` the artifact is within tolerance …`` (a model with
float biases that ORT quantizes on its own, ``tests/test_diagnose.py``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from qat.core.fake_quant import guarded
from qat.core.gate import GATE_RANGE, GateQuantizer
from qat.core.quantizer import Quantizer
from qat.export import ort_kernels, parity
from qat.training.control import deployed_inference

REWRITES = (
    "WeightBiasQuantization", "QDQSelectorActionTransformer", "QDQS8ToU8Transformer", "QDQPropagationTransformer",
    "DoubleQDQPairsRemover", "QDQFinalCleanupTransformer", "ConstantFolding", "MatMulAddFusion", "GemmActivationFusion",
    "ConvActivationFusion", "ConvAddActivationFusion", "MatMulIntegerToFloatFusion", "DynamicQuantizeMatMulFusion",
    "LayerNormFusion", "SimplifiedLayerNormFusion", "SkipLayerNormFusion", "GeluFusion", "BiasGeluFusion", "FastGeluFusion",
    "QuickGeluFusion", "AttentionFusion", "NhwcTransformer", "TransposeOptimizer", "CommonSubexpressionElimination",
    "ConstantSharing",
)
"""ONNX Runtime's graph rewrites (by the names its ``disabled_optimizers`` takes) that can change the
numbers of a quantized graph, in the order they are tried: the quantization-specific ones first."""

ADVICE = {
    "WeightBiasQuantization": "ORT quantizes a float bias of an integer layer to int32 at input scale × weight scale; "
                              "with the recipe's `bias: int32` (the default) training and the file use that bias too",
    "QDQSelectorActionTransformer": "ORT's fused integer kernels (QLinearConv, QGemm, QLinearAdd, …) requantize in float and "
                                    "round intermediate values differently from the Q/DQ graph",
    "QDQS8ToU8Transformer": "ORT rewrites int8 activations to uint8 (shifting zero points) for its x86 kernels",
}
"""What a named rewrite does to a quantized graph, and the fix where there is one."""

NOISE = 1e-6
"""The relative change of every float input with which PyTorch is compared against itself."""


@dataclass(frozen=True)
class Divergence:
    """The first quantized activation (in graph order) whose codes differ between ONNX Runtime and PyTorch."""

    tensor: str
    """ONNX name of the integer tensor (``conv1.input_quantized``)."""
    layer: str
    """What reads it, in words (``the input of `conv1```)."""
    differing: int
    """How many of its codes differ."""
    total: int
    steps: int
    """The largest difference, in quantization steps."""

    def describe(self) -> str:
        return (f"ONNX Runtime's codes first differ from PyTorch's at `{self.tensor}` ({self.layer}): {self.differing} of "
                f"{self.total} ({self.differing / self.total:.2%}), by up to {self.steps} step{'s' if self.steps > 1 else ''}")


@dataclass(frozen=True)
class Replay:
    """PyTorch fed ORT's activation codes (the module docstring's fifth measurement)."""

    steps: int
    """The largest difference, in steps, between a code PyTorch recomputes and ORT's."""
    differing: int
    total: int
    """How many recomputed codes differ from ORT's, of how many."""
    max_abs_diff: float
    """How far PyTorch's output then is from ORT's."""

    def explains(self, rtol: float, output_scale: float) -> bool:
        """Whether rounding flips account for the whole difference: every code within one step,
        and the output within ``rtol``."""
        return self.steps <= 1 and self.max_abs_diff <= rtol * output_scale

    def describe(self, rtol: float, output_scale: float) -> str:
        text = (f"Fed ORT's codes at every quantized activation, PyTorch recomputes them within {self.steps} "
                f"step{'' if self.steps == 1 else 's'} ({self.differing} of {self.total} codes differ) and its output is "
                f"{self.max_abs_diff:.4g} from ORT's")
        if self.explains(rtol, output_scale):
            text += (": every difference is a rounding flip at a code boundary, which this network carries to its output; "
                     "the graph computes what the model does")
        return text


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found (each part None when it could not be measured)."""

    unfused: parity.Parity | None
    """The artifact run without any of ORT's graph optimizations."""
    unfused_within: bool
    rewrite: str | None
    """The one rewrite whose absence brings the artifact within tolerance."""
    rewrite_parity: parity.Parity | None
    divergence: Divergence | None
    noise: parity.Parity | None = None
    """PyTorch against itself with its float inputs moved by :data:`NOISE` (on the batch where ORT is furthest)."""
    worst: parity.Parity | None = None
    """ORT against PyTorch on that batch."""
    replay: Replay | None = None
    """PyTorch fed ORT's activation codes on that batch."""
    rtol: float = 0.0
    """The tolerance the artifact was checked at (what the replay's output is judged against)."""

    @property
    def float_rounding(self) -> bool:
        """Whether PyTorch alone moves at least half as far as ORT does: float rounding explains the difference."""
        if self.noise is None or self.worst is None:
            return False
        return self.noise.max_abs_diff >= 0.5 * self.worst.max_abs_diff

    def describe(self) -> str:
        """The explanation, in sentences, for an error message."""
        parts = []
        if self.divergence is not None:
            parts.append(self.divergence.describe())
        if self.replay is not None and self.worst is not None:
            parts.append(self.replay.describe(self.rtol, self.worst.output_scale))
        if self.noise is not None:
            parts.append(f"PyTorch alone, with its float inputs moved by one part in {1 / NOISE:,.0f}, differs from itself by "
                         f"{self.noise.max_abs_diff:.4g} where ORT differs by {self.worst.max_abs_diff:.4g} (largest output "
                         f"{self.worst.output_scale:.4g})" + (": the model turns float rounding into differences of this size, "
                         "and no runtime can follow it more closely; a trained model usually does not" if self.float_rounding
                         else ""))
        if self.rewrite is not None:
            advice = ADVICE.get(self.rewrite)
            parts.append(f"Without ORT's rewrite `{self.rewrite}` the artifact is within tolerance ({self.rewrite_parity.describe()})"
                         + (f": {advice}" if advice else ""))
        elif self.unfused is not None and self.unfused_within:
            parts.append(f"Without ORT's graph optimizations {self.unfused.describe()}: the graph computes what PyTorch does, "
                         "and ORT's optimized graph, with no single rewrite to blame, does not")
        elif self.unfused is not None and not self.float_rounding:
            one_step = self.divergence is not None and self.divergence.steps <= 1
            parts.append(f"Without ORT's graph optimizations it differs too ({self.unfused.describe()}): "
                         + ("where the two first part, codes differ by one step, as float rounding at a code boundary does; "
                            "a wrong graph (a scale, a layer) moves codes by several steps" if one_step
                            else "the graph itself does not compute what PyTorch does"))
        return ". ".join(parts)


def perturbed(value: Any, generator: torch.Generator) -> Any:
    """``value`` with every element moved by a relative :data:`NOISE` if it is a float tensor, else ``value``."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value * (1 + NOISE * torch.randn(value.shape, generator=generator).to(value))
    return value


def rounding_sensitivity(model: nn.Module, batches: Sequence[torch.Tensor], seeds: int = 3) -> float:
    """How far a prepared model's outputs move, relative to their largest magnitude, when its input
    moves by one part in a million (:data:`NOISE`): the largest over ``batches`` and ``seeds``
    draws, with the model as deployed (eval mode, every quantizer on, observers off).

    A quantized network is discontinuous, so this is not 0; where it is near the export's ``rtol``,
    no runtime can match the model within ``rtol`` (module docstring).
    """
    worst = 0.0
    with deployed_inference(model):
        for batch in batches:
            reference = model(batch)
            for seed in range(seeds):
                moved = model(perturbed(batch, torch.Generator().manual_seed(seed)))
                worst = max(worst, ((moved - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item())
    return worst


def activation_codes(model: nn.Module, run: Callable[[], Any], forced: dict[str, np.ndarray] | None = None
                     ) -> dict[str, np.ndarray]:
    """PyTorch's integer codes of every static activation quantizer (and hard gate,
    :mod:`qat.core.gate`) while ``run()`` runs the model once, keyed by the ONNX name of the tensor
    (``<prefix>_quantized``; the first call of a quantizer that runs twice). With ``forced`` (codes
    by the same names), each quantizer that has codes there returns them, dequantized, instead of
    its own output (the fifth measurement)."""
    codes: dict[str, np.ndarray] = {}

    def hook(name: str):
        def record(q: Quantizer | GateQuantizer, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if name in codes or (isinstance(q, Quantizer) and not q.fake_quant_enabled):
                return None
            if isinstance(q, GateQuantizer):  # its output is the codes times scale / 6
                s, z = q.scale / GATE_RANGE, torch.zeros(())
            else:
                s, z = guarded(q.scale, q.zero_point, q.spec.qmin, q.spec.qmax)
            codes[name] = (torch.round(output.detach().float() / s) + z).cpu().numpy().astype(np.int64)
            given = (forced or {}).get(name)
            if given is None or given.shape != codes[name].shape:
                return None
            return ((torch.from_numpy(given.astype(np.float32)).to(output.device) - z) * s).to(output.dtype)
        return record

    with ExitStack() as stack:
        for name, module in model.named_modules():
            static = isinstance(module, Quantizer) and module.role == "activation" and not module.spec.dynamic
            if static or isinstance(module, GateQuantizer):
                prefix = name.removesuffix("_quantizer")
                stack.callback(module.register_forward_hook(hook(f"{prefix}_quantized")).remove)
        with torch.no_grad():
            run()
    return codes


def _with_code_outputs(path: Path, names: Sequence[str], folder: Path) -> tuple[Path, list[str]] | None:
    """A copy of the model at ``path`` whose graph also outputs the 8- and 16-bit codes in ``names``
    that a QuantizeLinear writes (ORT's Python API cannot return 4-bit tensors); None when the model
    cannot be copied (beyond protobuf's 2 GB)."""
    try:
        model = onnx.load(str(path))
    except Exception:
        return None
    written = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    initializers = {t.name: t for t in model.graph.initializer}
    wanted = []
    for name in names:
        node = written.get(name)
        if node is None or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        dtype = initializers[node.input[2]].data_type
        if dtype not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16):
            continue
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
        wanted.append(name)
    copy = folder / "with_codes.onnx"
    try:
        onnx.save(model, str(copy))
    except Exception:
        return None
    return copy, wanted


def _role(tensor: str) -> str:
    """``the input of `conv1``` for ``conv1.input_quantized``, ``the output of `layer1.0``` for ``layer1.0.output_quantized``."""
    prefix = tensor.removesuffix("_quantized")
    owner, _, what = prefix.rpartition(".")
    return f"the {what} of `{owner}`" if owner and what in ("input", "output") else f"`{prefix}`"


def ort_activation_codes(path: Path, config: dict[str, str], feeds: Sequence[np.ndarray], names: Sequence[str]
                         ) -> dict[str, np.ndarray] | None:
    """The codes ORT, running the artifact at ``path`` with its optimizations on ``feeds``, writes
    for the tensors ``names`` (those it can return); None when the model cannot be copied."""
    with tempfile.TemporaryDirectory() as folder:
        copied = _with_code_outputs(path, list(names), Path(folder))
        if copied is None:
            return None
        copy, wanted = copied
        session = ort.InferenceSession(str(copy), ort_kernels.session_options(config), providers=["CPUExecutionProvider"])
        outputs = parity.run_session(session, feeds)
    return {name: got.astype(np.int64) for name, got in zip(wanted, outputs[len(outputs) - len(wanted):], strict=True)}


def first_divergence(ort_codes: dict[str, np.ndarray], torch_codes: dict[str, np.ndarray]) -> Divergence | None:
    """The first tensor of ``ort_codes`` (graph order) whose codes differ from ``torch_codes``."""
    for name, got in ort_codes.items():
        want = torch_codes[name]
        if got.shape != want.shape:
            continue
        differ = got != want
        if differ.any():
            return Divergence(name, _role(name), int(differ.sum()), differ.size, int(np.abs(got - want).max()))
    return None


def replay(ort_codes: dict[str, np.ndarray], ort_outputs: Sequence[np.ndarray],
           torch_forced: Callable[[dict[str, np.ndarray]], tuple[list[np.ndarray], dict[str, np.ndarray]]]) -> Replay:
    """Run PyTorch fed ``ort_codes`` (``torch_forced`` returns its outputs and the codes it
    recomputed) and compare both with ORT's."""
    outputs, recomputed = torch_forced(ort_codes)
    steps = differing = total = 0
    for name, got in ort_codes.items():
        own = recomputed.get(name)
        if own is None or own.shape != got.shape:
            continue
        gap = np.abs(own - got)
        steps, differing, total = max(steps, int(gap.max())), differing + int((gap > 0).sum()), total + gap.size
    distance = max((float(np.abs(np.asarray(o, np.float32) - t).max()) for o, t in zip(ort_outputs, outputs, strict=True)), default=0.0)
    return Replay(steps, differing, total, distance)


def diagnose(path: Path, config: dict[str, str], feeds: list[list[np.ndarray]], outputs: list[list[np.ndarray]],
             compare: Callable[..., parity.Parity], rtol: float, min_top1: float | None,
             torch_codes: Callable[[int, dict[str, np.ndarray] | None], tuple[list[np.ndarray], dict[str, np.ndarray]]] | None = None,
             torch_noise: Callable[[int], list[np.ndarray] | None] | None = None) -> Diagnosis:
    """Explain why the artifact at ``path`` (run with session ``config`` on ``feeds``, giving
    ``outputs``) is not within ``rtol`` of PyTorch: the module docstring's five measurements.
    ``compare`` turns ORT's outputs into :class:`~qat.export.parity.Parity` against PyTorch's (for
    all batches, or for one: ``compare(outputs, batch=i)``). On the batch where ORT is furthest from PyTorch,
    ``torch_noise(i)`` (PyTorch's outputs with the float inputs moved by :data:`NOISE`, or None
    without float inputs) gives the third measurement, and ``torch_codes(i, forced)`` (PyTorch's
    outputs and :func:`activation_codes`, fed ``forced`` codes where not None) the fourth and fifth."""

    def measured(options: ort.SessionOptions, disabled: Sequence[str] = ()) -> parity.Parity | None:
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
            return compare([parity.run_session(session, f) for f in feeds])
        except Exception:  # a non-finite output, or a graph ORT cannot run that way: no figure
            return None

    plain = ort_kernels.session_options(config)
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = measured(plain)
    unfused_within = unfused is not None and unfused.within(rtol, min_top1)
    rewrite = rewrite_parity = None
    if unfused_within:
        for name in REWRITES:
            candidate = measured(ort_kernels.session_options(config), [name])
            if candidate is not None and candidate.within(rtol, min_top1):
                rewrite, rewrite_parity = name, candidate
                break
    per_batch = [compare([got], batch=i) for i, got in enumerate(outputs)]
    worst = max(range(len(feeds)), key=lambda i: per_batch[i].max_abs_diff)
    noise = None
    if torch_noise is not None and (moved := torch_noise(worst)) is not None:
        noise = compare([moved], batch=worst)
    divergence = replayed = None
    if torch_codes is not None:
        _, own = torch_codes(worst, None)
        try:
            codes = ort_activation_codes(path, config, feeds[worst], list(own))
        except Exception:  # the copy with more outputs does not load: leave these parts out
            codes = None
        if codes:
            divergence = first_divergence(codes, own)
            if divergence is not None:
                replayed = replay(codes, outputs[worst], lambda given: torch_codes(worst, given))
    return Diagnosis(unfused, unfused_within, rewrite, rewrite_parity, divergence, noise, per_batch[worst], replayed, rtol)
