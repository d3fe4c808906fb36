"""`qat.sensitivity`: which layers suffer at which bit width, one layer at a time.

For each candidate weight bit width ``b`` the float model is copied and prepared with the recipe,
every quantized weight set to ``b`` bits (the recipe's granularity, group size, observers and
activation specs are kept; layers it leaves float stay float). One calibration observes every layer's ranges at once; then each
layer in turn is fake-quantized alone, everything else float, and measured:

- ``metric``: what ``evaluate(model)`` returns (accuracy, perplexity, …), when given;
- ``output_sqnr_db``: the model's output against the float model's on the calibration batches,
  ``10 log10(Σy² / Σ(y − ŷ)²)``: needs no labels, and its noise powers add up across layers
  (independent quantization errors), which is what :mod:`qat.analysis.mixed_precision` relies on;
- ``weight_bytes``: the layer's weights stored at ``b`` bits, with their scales and zero points.

Layers are ranked by their metric loss when ``evaluate`` is given, else by output SQNR.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from qat.core.quantizer import Quantizer
from qat.errors import QATError
from qat.modules import QuantizedLayer
from qat.preparation.prepare import input_quantizers, is_prepared, prepare
from qat.preparation.recipe import QuantRecipe
from qat.training.batches import call_model, model_inputs
from qat.training.calibrate import calibrate
from qat.training.control import set_fake_quant

DEFAULT_BITS = (8, 4)


def set_weight_bits(model: nn.Module, bits: int) -> None:
    """Give every quantized weight of a prepared model ``bits`` bits, the rest of its spec kept
    (granularity, group size, observer); layers the recipe leaves float stay float. The new
    quantizers have observed nothing yet.

    Example:
        >>> import torch, qat
        >>> model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"weight": {"bits": 8, "group_size": 2,
        ...                     "granularity": "per_group"}})
        >>> set_weight_bits(model, 3)
        >>> model[0].weight_quantizer.spec.describe()
        'int3 per_group(2) sym minmax'
    """
    for layer in model.modules():
        if isinstance(layer, QuantizedLayer) and layer.weight_quantizer is not None:
            old = layer.weight_quantizer
            layer.weight_quantizer = Quantizer(old.spec.replace(bits=bits), layer.weight.shape, "weight",
                                               default_axis=old.axis).to(layer.weight.device)


def weight_bytes(layer: QuantizedLayer, bits: int | None = None) -> int:
    """Bytes of a prepared layer's weight as deployed: ``bits`` (default: its quantizer's) per
    element, packed, plus a float32 scale per channel or group and an 8-bit zero point each when
    the format is asymmetric. A layer whose weight is not quantized counts 4 bytes an element."""
    quantizer = layer.weight_quantizer
    if quantizer is None:
        return layer.weight.numel() * layer.weight.element_size()
    bits = quantizer.spec.bits if bits is None else bits
    codes = math.ceil(layer.weight.numel() * bits / 8)
    scales = quantizer.scale.numel()
    return codes + 4 * scales + (0 if quantizer.spec.symmetric else scales * math.ceil(bits / 8))


def other_bytes(model: nn.Module) -> int:
    """Bytes of every float parameter and buffer that is not a quantized weight or a quantizer's
    state (biases, norms, float layers): what a deployed model stores besides the quantized
    weights. A BatchNorm folded into its convolution counts as float, a slight overestimate."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    skip = {id(m.weight) for m in layers if m.weight_quantizer is not None}
    skip |= {id(t) for q in model.modules() if isinstance(q, Quantizer) for t in [*q.parameters(), *q.buffers()]}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in skip and t.is_floating_point()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer quantized alone at one weight bit width."""

    layer: str
    bits: int
    metric: float | None
    """``evaluate(model)`` with only this layer quantized; None without ``evaluate``."""
    loss: float | None
    """How much worse than float the metric is (positive: worse, in the metric's units)."""
    output_sqnr_db: float
    weight_bytes: int


@dataclass
class SensitivityTable:
    """Every (layer, bits) measurement of :func:`sensitivity`, and what the mixed-precision
    search needs besides: the float metric, the bytes of everything else in the model."""

    rows: list[LayerSensitivity]
    float_metric: float | None
    higher_is_better: bool
    other_bytes: int
    recipe: dict[str, Any]
    """The recipe the measurements used (its weight bit widths replaced by each candidate)."""
    layers: list[str] = field(init=False)
    bits: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.layers = list(dict.fromkeys(row.layer for row in self.rows))
        self.bits = sorted({row.bits for row in self.rows}, reverse=True)

    def get(self, layer: str, bits: int) -> LayerSensitivity:
        for row in self.rows:
            if row.layer == layer and row.bits == bits:
                return row
        raise KeyError(f"no measurement of layer `{layer}` at {bits} bits")

    def ranked(self, bits: int | None = None) -> list[LayerSensitivity]:
        """The rows at ``bits`` (default: the fewest measured), most sensitive first."""
        bits = min(self.bits) if bits is None else bits
        rows = [row for row in self.rows if row.bits == bits]
        if self.float_metric is not None:
            return sorted(rows, key=lambda r: -r.loss)
        return sorted(rows, key=lambda r: r.output_sqnr_db)

    def model_bytes(self, bits: Mapping[str, int]) -> int:
        """Bytes of the model with each layer's weights at ``bits[layer]``."""
        return self.other_bytes + sum(self.get(layer, bits[layer]).weight_bytes for layer in self.layers)

    def _columns(self) -> list[str]:
        kinds = ("loss", "SQNR dB") if self.float_metric is not None else ("SQNR dB",)
        return [f"{b}-bit {kind}" for b in self.bits for kind in kinds]

    def _cells(self, layer: str) -> list[str]:
        cells = []
        for b in self.bits:
            row = self.get(layer, b)
            if self.float_metric is not None:
                cells.append(f"{row.loss:+.4g}")
            cells.append(f"{row.output_sqnr_db:.1f}")
        return cells

    def to_markdown(self) -> str:
        """A markdown table, one row per layer, the loss (with a metric) and SQNR per bit width."""
        columns = self._columns()
        lines = ["| layer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {layer} | " + " | ".join(self._cells(layer)) + " |" for layer in self.layers]
        return "\n".join(lines)

    def __rich__(self) -> Table:
        table = Table(title="Per-layer sensitivity: each layer quantized alone", title_justify="left")
        table.add_column("layer")
        for column in self._columns():
            table.add_column(column, justify="right")
        for layer in self.layers:
            table.add_row(layer, *self._cells(layer))
        return table

    def __str__(self) -> str:
        console = Console(width=160, record=True, force_terminal=False)
        with console.capture() as capture:
            console.print(self)
        return capture.get()

    def plot(self, ax: Any = None) -> Any:
        """Grouped bars, one group per layer and one bar per bit width: the output SQNR in dB
        (higher is better). Returns the matplotlib Axes."""
        from qat.analysis.plots import NEUTRAL, themed_axes

        ax = themed_axes(ax, figsize=(max(6.0, 0.45 * len(self.layers) + 2), 3.6))
        width = 0.8 / len(self.bits)
        for i, b in enumerate(self.bits):
            values = [self.get(layer, b).output_sqnr_db for layer in self.layers]
            positions = [x + (i - (len(self.bits) - 1) / 2) * width for x in range(len(self.layers))]
            ax.bar(positions, [min(v, 99.0) for v in values], width, label=f"{b}-bit weights")
        ax.set_xticks(range(len(self.layers)), self.layers, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("model output SQNR (dB)")
        ax.set_title("Each layer quantized alone: higher is safer")
        finite = [min(row.output_sqnr_db, 99.0) for row in self.rows]
        ax.set_ylim(min(0.0, *finite), max(finite) * 1.3)  # headroom for the legend
        ax.legend(frameon=False, labelcolor=NEUTRAL, ncols=len(self.bits), loc="upper right")
        ax.figure.tight_layout()
        return ax


def _outputs(model: nn.Module, batches: Sequence[Any]) -> list[Tensor]:
    with torch.no_grad():
        return [torch.cat([t.detach().float().flatten() for t in tree_leaves(call_model(model, b)) if torch.is_tensor(t)])
                for b in batches]


def _sqnr_db(reference: list[Tensor], approximation: list[Tensor]) -> float:
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    noise = sum(float((r.double() - a.double()).pow(2).sum()) for r, a in zip(reference, approximation, strict=True))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _layer_quantizers(model: nn.Module) -> dict[str, list[Quantizer]]:
    """Each quantized layer's weight quantizer and the quantizer its input goes through (the
    producer's output quantizer where the recipe's ``residuals`` moved it there)."""
    modules = dict(model.named_modules())
    return {name: [q for q in (modules[name].weight_quantizer, iq) if q is not None]
            for name, (iq, _) in input_quantizers(model).items()}


def sensitivity(
    model: nn.Module,
    recipe: QuantRecipe | Mapping[str, Any] | str | None,
    calibration: Iterable[Any],
    evaluate: Callable[[nn.Module], float] | None = None,
    bits: Sequence[int] = DEFAULT_BITS,
    *,
    higher_is_better: bool = True,
    num_batches: int | None = 8,
    example_inputs: Any = None,
    progress: bool = True,
) -> SensitivityTable:
    """Quantize one layer at a time to each of ``bits`` and measure what it costs.

    Args:
        model: the float model (not prepared; it is copied, never changed).
        recipe: the recipe the model would be quantized with; only the weight bit width is varied.
        calibration: batches (a list or a DataLoader: it is read once per bit width) to observe
            ranges on and to compare outputs on; ``num_batches`` of them are used.
        evaluate: optional ``evaluate(model) -> float`` (validation accuracy, perplexity…),
            called once in float and once per layer and bit width.
        bits: candidate weight bit widths.
        higher_is_better: the direction of ``evaluate``'s metric (False for perplexity).
        example_inputs: passed to :func:`qat.prepare` (needed for BatchNorm folding).
        progress: a progress bar over the measurements.

    Example:
        >>> import torch, qat
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> table = qat.sensitivity(net, {"weight": {"bits": 8}}, [torch.randn(32, 16)], bits=(8, 2), progress=False)
        >>> table.layers, table.bits
        (['0', '2'], [8, 2])
        >>> table.get("0", 8).output_sqnr_db > table.get("0", 2).output_sqnr_db
        True
    """
    if is_prepared(model):
        raise QATError("sensitivity needs the float model: pass it before qat.prepare (it is copied, not changed)")
    bits = sorted(set(bits), reverse=True)
    if not bits or any(not isinstance(b, int) or not 2 <= b <= 16 for b in bits):
        raise QATError(f"bits: every candidate must be an integer from 2 to 16; got {list(bits)}")
    batches = [model_inputs(b) for b in islice(calibration, num_batches)]
    if not batches:
        raise QATError("sensitivity got no calibration batches: the iterable is empty")
    base = QuantRecipe.coerce(recipe)
    was_training = model.training
    model.eval()
    try:
        reference = _outputs(model, batches)
        float_metric = None if evaluate is None else float(evaluate(model))
    finally:
        model.train(was_training)
    rows: list[LayerSensitivity] = []
    others = None
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("sensitivity", total=None)
        for b in bits:
            quantized = prepare(copy.deepcopy(model), base, example_inputs=example_inputs)
            set_weight_bits(quantized, b)
            calibrate(quantized, batches)
            quantized.eval()
            layers = {name: m for name, m in quantized.named_modules()
                      if isinstance(m, QuantizedLayer) and m.weight_quantizer is not None}
            if not layers:
                raise QATError("the recipe quantizes no layer's weights in this model: nothing to measure")
            bar.update(task, total=len(layers) * len(bits))
            others = other_bytes(quantized) if others is None else others
            set_fake_quant(quantized, False)
            own = _layer_quantizers(quantized)
            for name, layer in layers.items():
                for q in own[name]:
                    q.enable_fake_quant(True)
                metric = None if evaluate is None else float(evaluate(quantized))
                loss = None if metric is None else (float_metric - metric) * (1 if higher_is_better else -1)
                rows.append(LayerSensitivity(name, b, metric, loss, _sqnr_db(reference, _outputs(quantized, batches)),
                                             weight_bytes(layer, b)))
                for q in own[name]:
                    q.enable_fake_quant(False)
                bar.advance(task)
    return SensitivityTable(rows, float_metric, higher_is_better, others or 0, base.to_dict())
