"""`qat.prepare`: swap a float model's layers for quantized twins according to a recipe.

Walks the model, decides for every layer with parameters whether it is quantized (and with
which specs) or left float (and why), folds BatchNorms into their convolutions, swaps the layers
in place and records the recipe and the float layers as ``model.qat_state``, which lets
:func:`qat.summary` list what was left float. Nothing is skipped silently: every parameterised layer is either
quantized, folded, or listed with its reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qat.core.quantizer import Quantizer
from qat.errors import ConfigError, QATError
from qat.modules import TWINS, QuantConvNd, QuantizedLayer, twin_for
from qat.modules.activation import ACTIVATION_TWINS
from qat.preparation.bn_fold import FOLDABLE, FoldPlan, find_conv_bn_pairs, is_foldable_bn
from qat.preparation.recipe import QuantRecipe
from qat.preparation.residuals import OUTPUT_QUANTIZER, attach_output_quantizer, find_residuals, folded_name
from qat.version import __version__

STATE_NAME = "qat_state"

OPAQUE = (nn.MultiheadAttention,)
"""Layers that read their children's weights directly (``F.multi_head_attention_forward`` uses
``out_proj.weight``), so a twin of a child would never run: the whole layer stays float."""


@dataclass
class QATState:
    """What :func:`prepare` leaves on the model as ``model.qat_state``: the recipe it used and the
    layers it left float, with the reason for each.

    A plain attribute rather than a submodule: a submodule would become a step of an
    ``nn.Sequential`` model. Checkpoint-level metadata is the Lightning callback's job.
    """

    recipe: QuantRecipe
    float_layers: dict[str, str] = field(default_factory=dict)
    bn_folds: dict[str, str] = field(default_factory=dict)
    """Folded pairs, convolution name → BatchNorm name: with the recipe, all it takes to prepare
    a fresh model into the same structure (``prepare(model, recipe, bn_folds=...)``)."""
    residuals: dict[str, list[str]] = field(default_factory=dict)
    """Modules whose output is quantized (recipe ``residuals: true``) → the layers whose input
    quantizer that output quantizer replaced (:mod:`qat.preparation.residuals`)."""
    calibration_clipped: dict[str, float] = field(default_factory=dict)
    """What :func:`qat.calibrate` measured on its last batch: the share of each quantized input
    (``<layer>/input``, ``<module>/output``) outside its range."""
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to prepare a fresh model the same way: ``qat.prepare(model,
        d["recipe"], bn_folds=d["bn_folds"], residuals=d.get("residuals"))`` (plain values: loads
        with ``weights_only=True``)."""
        return {"version": self.version, "recipe": self.recipe.to_dict(), "bn_folds": dict(self.bn_folds),
                **({"residuals": {k: list(v) for k, v in self.residuals.items()}} if self.recipe.quantized_operators else {})}


def input_quantizers(model: nn.Module) -> dict[str, tuple[Quantizer | None, str | None]]:
    """Each quantized layer → the quantizer its input goes through, and the module that owns it
    when it is not the layer's own: with the recipe's ``residuals``, a layer's input quantizer may
    have moved to the output of the module producing that input."""
    state = getattr(model, STATE_NAME, None)
    fed_by = {} if state is None else {reader: producer for producer, readers in state.residuals.items() for reader in readers}
    modules = dict(model.named_modules())
    return {name: ((getattr(modules[fed_by[name]], OUTPUT_QUANTIZER), fed_by[name]) if name in fed_by else (layer.input_quantizer, None))
            for name, layer in modules.items() if isinstance(layer, QuantizedLayer)}


def is_prepared(model: nn.Module) -> bool:
    """True when ``model`` already holds quantized layers."""
    return isinstance(getattr(model, STATE_NAME, None), QATState) or any(isinstance(m, QuantizedLayer) for m in model.modules())


def children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (name, child), a child registered under two names included (``named_children``
    reports a shared child once; a swap must reach every name)."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def replace_children(model: nn.Module, replacements: Mapping[int, nn.Module]) -> None:
    """Put ``replacements[id(child)]`` in place of every matching child, under every name."""
    for parent in list(model.modules()):
        for name, child in children(parent):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named descendants, not entering opaque layers or layers that have a twin."""
    for name, child in children(module):
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, OPAQUE) and twin_for(child) is None:
            yield from _walk(child, full)


def _has_own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _float_reason(layer: nn.Module) -> str:
    """Why a parameterised layer without a twin stays float."""
    cls = type(layer)
    if isinstance(layer, OPAQUE):
        return f"{cls.__name__} reads its weights directly: no quantized twin (its children stay float too)"
    base = next((t for t in TWINS if isinstance(layer, t)), None)
    if base is not None:
        return f"{cls.__name__} subclasses {base.__name__} with its own code: no quantized twin"
    if "Norm" in cls.__name__:
        return "normalization layer: kept in float"
    params = ", ".join(name for name, p in layer.named_parameters(recurse=False))
    return f"no quantized twin for {cls.__name__} (parameters: {params})"


def _fold_plan(model: nn.Module, recipe: QuantRecipe, example_inputs: Any, bn_folds: Mapping[str, str] | None) -> FoldPlan:
    """Conv+BatchNorm pairs to fold, and the reason each other BatchNorm stays."""
    bns = {n: m for n, m in model.named_modules() if is_foldable_bn(m)}
    if bn_folds is not None:
        layers = dict(model.named_modules())
        for conv, bn in bn_folds.items():
            if bn not in bns or type(layers.get(conv)) not in FOLDABLE:
                raise QATError(f"bn_folds pairs `{conv}` with `{bn}`, but {type(model).__name__} has no such "
                               "Conv1d/2d/3d and BatchNorm: was it built with another configuration?")
        folded = set(bn_folds.values())
        return FoldPlan(dict(bn_folds), {n: "BatchNorm not folded: not in bn_folds" for n in bns if n not in folded})
    if recipe.fold_bn and example_inputs is not None:
        return find_conv_bn_pairs(model, example_inputs)
    why = "the recipe sets fold_bn false" if not recipe.fold_bn else "pass example_inputs to qat.prepare to find Conv+BatchNorm pairs"
    return FoldPlan(unfolded={n: f"BatchNorm not folded: {why}" for n in bns})


def needs_example_inputs(model: nn.Module, recipe: QuantRecipe | Mapping[str, Any] | str | None = None) -> bool:
    """True when :func:`prepare` would trace example inputs: the recipe folds and there is a
    BatchNorm, or the recipe quantizes residual connections or other operators."""
    recipe = QuantRecipe.coerce(recipe)
    return bool(recipe.quantized_operators) or (recipe.fold_bn and any(is_foldable_bn(m) for m in model.modules()))


def prepare(
    model: nn.Module,
    recipe: QuantRecipe | Mapping[str, Any] | str | None = None,
    example_inputs: Any = None,
    *,
    bn_folds: Mapping[str, str] | None = None,
    residuals: Mapping[str, Sequence[str]] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place for QAT and return it.

    Args:
        model: a float ``nn.Module`` (torchvision, timm, Hugging Face, or your own).
        recipe: a :class:`~qat.QuantRecipe`, a mapping, a YAML path, or None for the default
            (int8 per-channel weights, uint8 per-tensor inputs).
        example_inputs: inputs the model's forward accepts (a tensor, a tuple of positional
            arguments, or a mapping of keyword arguments); needed to find Conv+BatchNorm pairs.
        bn_folds: fold exactly these convolution → BatchNorm pairs instead of tracing (what
            ``model.qat_state.bn_folds`` of an earlier preparation, or a checkpoint, records).
        residuals: with a recipe that sets ``residuals: true``, quantize exactly these module
            outputs instead of tracing (what ``model.qat_state.residuals`` records).

    Example:
        >>> import torch, qat
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
        >>> model = qat.prepare(model, {"weight": {"bits": 4}}, example_inputs=torch.randn(2, 3, 8, 8))
        >>> type(model[0]).__name__, type(model[1]).__name__
        ('QuantConv2d', 'Identity')
    """
    recipe = QuantRecipe.coerce(recipe)
    if is_prepared(model):
        raise QATError("the model is already prepared (it holds quantized layers); call qat.prepare on a float model")
    if twin_for(model) is not None:
        raise QATError(f"qat.prepare swaps the layers inside a model; to quantize a single {type(model).__name__}, "
                       "wrap it: nn.Sequential(layer)")
    fold_plan = _fold_plan(model, recipe, example_inputs, bn_folds)
    fold_pairs = fold_plan.pairs
    float_layers = dict(fold_plan.unfolded)
    if _has_own_parameters(model):  # parameters held by the model itself
        float_layers[""] = _float_reason(model)
    twins: dict[int, QuantizedLayer] = {}
    twin_names: dict[str, QuantizedLayer] = {}
    matched_rules: set[int] = set()
    matched_skips: set[int] = set()
    for name, layer in _walk(model):
        twin_cls = twin_for(layer)
        if twin_cls is None:
            if name not in float_layers and _has_own_parameters(layer) and not is_foldable_bn(layer):
                float_layers[name] = _float_reason(layer)
            continue
        if id(layer) in twins:  # the same layer object reached under another name
            twin_names[name] = twins[id(layer)]
            continue
        skip = recipe.skip_reason(name)
        matched_skips.update(recipe.skipped_by(name))
        weight, activation, matched = recipe.specs_for(name, layer)
        matched_rules.update(matched)
        if not twin_cls.takes_activation:
            activation = None
        if skip or (weight is None and activation is None):
            float_layers[name] = skip or f"the recipe turns off its weight and input quantization (rules {matched})"
            continue
        try:
            twins[id(layer)] = twin_names[name] = twin_cls.from_float(layer, weight, activation, int32_bias=recipe.bias == "int32")
        except QATError as error:  # a layer the twin cannot take (a LoRA layer with adapter dropout): name it
            raise QATError(f"layer `{name}`: {error}") from None

    names = list(twin_names) + list(float_layers)
    # a rule or skip pattern that matches nothing is a typo: an error keyed like the recipe's own (a
    # Lightning config puts its place in front: trainer.callbacks[0].init_args.recipe.skip[0])
    unmatched = [(f"rules[{i}]", rule.describe()) for i, rule in enumerate(recipe.rules) if i not in matched_rules]
    unmatched += [(f"skip[{i}]", repr(pattern)) for i, pattern in enumerate(recipe.skip) if i not in matched_skips]
    if unmatched:
        key, what = unmatched[0]
        raise ConfigError(key, f"{what} matches no layer of {type(model).__name__}; layer names look like: {', '.join(names[:6])}")
    if not twins:
        raise QATError(f"the recipe quantizes no layer of {type(model).__name__}: no Linear, Conv, ConvTranspose2d or "
                       f"Embedding layer is selected (left float: {', '.join(list(float_layers)[:6]) or 'none'})")

    _share_tied_quantizers(twins.values())
    plan = _residual_plan(model, recipe, example_inputs, residuals, twin_names, fold_pairs)
    bn_by_name = dict(model.named_modules())
    replacements: dict[int, nn.Module] = dict(twins)
    folded: dict[str, str] = {}
    for conv_name, bn_name in fold_pairs.items():
        twin = twin_names.get(conv_name)
        if isinstance(twin, QuantConvNd) and twin.weight_quantizer is not None:
            bn = bn_by_name[bn_name]
            twin.attach_bn(bn)
            replacements[id(bn)] = nn.Identity()
            folded[conv_name] = bn_name
        else:
            float_layers[bn_name] = f"BatchNorm not folded: its convolution `{conv_name}` is left float"
    for twin in twins.values():
        if getattr(twin, "bias", None) is None and getattr(twin, "bn", None) is None:
            twin.bias_quantizer = None  # no bias, and no folded BatchNorm to give it one
    if "activation" in recipe.quantized_operators:
        # every Hardswish and Hardsigmoid module computes its gate on the fixed grid (qat.modules.activation)
        device = next(model.parameters()).device
        replacements.update({id(m): ACTIVATION_TWINS[type(m)]().to(device) for m in model.modules() if type(m) in ACTIVATION_TWINS})
    replace_children(model, replacements)
    _quantize_outputs(model, recipe, plan, twin_names)
    setattr(model, STATE_NAME, QATState(recipe, float_layers, folded, plan))
    return model


def _share_tied_quantizers(twins: Iterable[QuantizedLayer]) -> None:
    """Layers that hold one weight tensor (an LLM's embedding tied to its output head) and quantize
    it alike get one weight quantizer: the table is stored once when deployed, so it is trained
    with one set of scales, each learned from both uses. Where the recipe quantizes the uses
    differently, each keeps its own quantizer (and the weight is stored twice)."""
    by_weight: dict[int, QuantizedLayer] = {}
    for twin in twins:
        q = twin.weight_quantizer
        if q is None:
            continue
        first = by_weight.setdefault(id(twin.weight), twin)
        shared = first.weight_quantizer
        if first is not twin and (shared.spec, shared.axis, shared.scale.shape) == (q.spec, q.axis, q.scale.shape):
            twin.weight_quantizer = shared


def _residual_plan(model: nn.Module, recipe: QuantRecipe, example_inputs: Any, residuals: Mapping[str, Sequence[str]] | None,
                   twins: Mapping[str, QuantizedLayer], fold_pairs: Mapping[str, str]) -> dict[str, list[str]]:
    """Module → the layers whose input its quantized output replaces (empty unless the recipe
    sets ``residuals`` or ``operators``); traced on the float model, before any layer is swapped."""
    if not recipe.quantized_operators:
        return {}
    names = {*dict(model.named_modules()), *(folded_name(n, fold_pairs) for n, _ in model.named_modules())}
    if residuals is not None:
        for name, readers in residuals.items():
            missing = [n for n in (name, *readers) if n not in names]
            if missing:
                raise QATError(f"residuals names `{missing[0]}`, which {type(model).__name__} does not have: was it built "
                               "with another configuration?")
        return {name: list(readers) for name, readers in residuals.items()}
    if example_inputs is None:
        key = "residuals: true" if recipe.residuals else f"operators: {list(recipe.operators)}"
        raise QATError(f"the recipe sets `{key}`: pass example_inputs to qat.prepare to find the operators whose "
                       "operands and results it quantizes")
    readers = {name: twin.input_quantizer.spec if twin.input_quantizer is not None else None for name, twin in twins.items()}
    # a gated Hardsigmoid's output is on its gate's fixed grid already: not quantized again
    gated = "activation" in recipe.quantized_operators
    on_grid = tuple(t.float_cls for t in ACTIVATION_TWINS.values() if t.output_on_grid) if gated else ()
    return find_residuals(model, example_inputs, readers, fold_pairs, recipe.quantized_operators, on_grid).outputs


def _quantize_outputs(model: nn.Module, recipe: QuantRecipe, plan: Mapping[str, list[str]],
                      twins: Mapping[str, QuantizedLayer]) -> None:
    """Attach the planned output quantizers; the layers they feed give up their own input quantizer."""
    modules = dict(model.named_modules())
    for name, readers in plan.items():
        specs = [twins[r].input_quantizer.spec for r in readers if r in twins and twins[r].input_quantizer is not None]
        attach_output_quantizer(modules[name], specs[0] if specs else recipe.activation)
        for reader in readers:
            if reader in twins:
                twins[reader].input_quantizer = None
                twins[reader].input_from = (getattr(modules[name], OUTPUT_QUANTIZER),)
