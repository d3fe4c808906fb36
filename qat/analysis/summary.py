"""`qat.summary` (what was quantized, how, and how well) and `qat.strip` (back to a float model)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from rich.console import Console, Group
from rich.measure import Measurement
from rich.table import Table
from torch import Tensor, nn

from qat.core.quantizer import Quantizer
from qat.errors import QATError
from qat.modules import QuantConvNd, QuantizedLayer
from qat.modules.activation import QuantizedActivation
from qat.preparation.prepare import STATE_NAME, QATState, input_quantizers, replace_children
from qat.preparation.residuals import OUTPUT_QUANTIZER, detach_output_quantizer
from qat.training.sharding import quantized_layers


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(Σx² / Σ(x - x̂)²)`` in dB (inf when exact)."""
    reference, approximation = reference.detach().double(), approximation.detach().double()
    noise = (reference - approximation).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass(frozen=True)
class LayerReport:
    """One quantized layer: its specs, observed ranges and weight SQNR (None until calibrated)."""

    name: str
    layer: str
    weight: str
    activation: str
    weight_range: tuple[float, float] | None
    input_range: tuple[float, float] | None
    weight_sqnr_db: float | None
    bn_folded: bool


@dataclass(frozen=True)
class QuantSummary:
    """What :func:`summary` returns: printable (rich or plain text) and inspectable."""

    layers: list[LayerReport]
    float_layers: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)
    """Modules whose output is quantized (recipe ``residuals`` or ``operators``) → spec and observed range."""

    def __rich__(self) -> Group:
        table = Table(title=f"Quantized layers ({len(self.layers)})", title_justify="left")
        for column in ("layer", "type", "weight", "input", "weight range", "input range", "SQNR dB"):
            table.add_column(column, justify="right" if column == "SQNR dB" else "left")
        for r in self.layers:
            table.add_row(
                r.name, r.layer + (" +BN" if r.bn_folded else ""), r.weight, r.activation,
                _range(r.weight_range), _range(r.input_range),
                "-" if r.weight_sqnr_db is None else f"{r.weight_sqnr_db:.1f}",
            )
        left = Table(title=f"Left float ({len(self.float_layers)})", title_justify="left")
        left.add_column("layer")
        left.add_column("reason")
        for name, reason in self.float_layers.items():
            left.add_row(name or "(the model itself)", reason)
        if not self.outputs:
            return Group(table, left)
        outputs = Table(title=f"Quantized outputs, residual connections and other operators ({len(self.outputs)})", title_justify="left")
        outputs.add_column("module")
        outputs.add_column("output")
        for name, described in self.outputs.items():
            outputs.add_row(name, described)
        return Group(table, outputs, left)

    def __str__(self) -> str:
        """The tables as plain text at their natural width: every layer name whole."""
        console = Console(force_terminal=False, width=_UNBOUNDED)
        width = Measurement.get(console, console.options, self.__rich__()).maximum
        console = Console(force_terminal=False, width=width)
        with console.capture() as capture:
            console.print(self)
        return capture.get()

    def show(self, console: Console | None = None) -> None:
        """Print the tables: fitted to a terminal's width, but at their natural width elsewhere (a log
        file, a pipe, where rich would assume 80 columns and cut the layer names)."""
        console = console or Console()
        if console.is_terminal or console.is_jupyter:
            console.print(self)
        else:
            console.out(str(self), end="", highlight=False)


_UNBOUNDED = 10_000
"""A width no table of a model reaches: what a table measures within it is its natural width."""


def _range(r: tuple[float, float] | None) -> str:
    return "-" if r is None else f"[{r[0]:.4g}, {r[1]:.4g}]"


def observed_range(q: Quantizer | None) -> tuple[float, float] | None:
    """The (min, max) a static quantizer has observed over all its groups; None until calibrated."""
    if q is None or q.observer is None or not q.calibrated:
        return None
    return q.observer.min_val.min().item(), q.observer.max_val.max().item()


@torch.no_grad()
def weight_sqnr_db(layer: QuantizedLayer) -> float | None:
    """SQNR of a layer's fake-quantized weight (folded, for conv+BN) in dB; None until calibrated."""
    wq = layer.weight_quantizer
    if wq is None or not wq.calibrated:
        return None
    weight, _ = layer.float_weight_bias()
    return sqnr_db(weight, wq.fake_quantize(weight))


def _state(model: nn.Module) -> QATState:
    state = getattr(model, STATE_NAME, None)
    if not isinstance(state, QATState):
        raise QATError(f"{type(model).__name__} is not prepared: call qat.prepare(model, recipe) first")
    return state


@torch.no_grad()
def summary(model: nn.Module) -> QuantSummary:
    """Per-layer table of a prepared model: specs, observed ranges, weight SQNR, float layers.

    Ranges and SQNR appear once the quantizers have observed data (a forward pass in training
    or calibration). ``print(qat.summary(model))`` prints it as plain text, every layer name whole;
    ``qat.summary(model).show()`` in colour on a terminal.
    """
    state = _state(model)
    modules = dict(model.named_modules())
    inputs = input_quantizers(model)
    sqnr = {name: weight_sqnr_db(layer) for name, layer in quantized_layers(model)}  # weights whole under FSDP2 too
    reports = []
    for name, (iq, producer) in inputs.items():
        layer = modules[name]
        wq = layer.weight_quantizer
        reports.append(LayerReport(
            name=name,
            layer=type(layer).float_cls.__name__,
            weight=wq.spec.describe() if wq is not None else "float",
            activation=(iq.spec.describe() if iq is not None else "float") + (f" (`{producer}` output)" if producer else ""),
            weight_range=observed_range(wq),
            input_range=observed_range(iq),
            weight_sqnr_db=sqnr[name],
            bn_folded=isinstance(layer, QuantConvNd) and layer.bn is not None,
        ))
    outputs = {name: f"{q.spec.describe()} {_range(observed_range(q))}"
               for name in state.residuals if (q := getattr(modules[name], OUTPUT_QUANTIZER)) is not None}
    return QuantSummary(reports, dict(state.float_layers), outputs)


def strip(model: nn.Module) -> nn.Module:
    """A float copy of a prepared model with the fake-quantized weights baked in.

    Every quantized layer becomes its plain float type holding ``Q(W)`` (folded with its
    BatchNorm where one was folded); inputs are no longer quantized. The prepared model is left
    untouched. Useful to compare against, or to run where lightning-qat is not installed.
    """
    _state(model)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLayer) and layer.weight_quantizer is not None and not layer.weight_quantizer.calibrated:
            raise QATError(f"layer `{name}` was never calibrated: run forward passes with observers on before qat.strip")
    stripped = copy.deepcopy(model)
    del stripped.__dict__[STATE_NAME]
    for module in stripped.modules():
        detach_output_quantizer(module)
    replace_children(stripped, {id(m): m.to_float() for m in stripped.modules() if isinstance(m, QuantizedLayer | QuantizedActivation)})
    return stripped
