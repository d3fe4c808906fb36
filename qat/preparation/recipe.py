"""`QuantRecipe`: what to quantize, and how, in one validated object.

A recipe holds the default weight and activation specs, an ordered list of rules that change
them for some layers (matched by layer type and/or a regular expression on the layer's
fully-qualified name), and a skip list. Every rule that matches a layer applies, in order; a
rule's ``weight`` / ``activation`` is a partial override (``{bits: 8}``), ``null`` to turn that
quantizer off, or absent to leave it alone. Names match with ``re.fullmatch``. A rule or a skip
pattern that matches no layer is an error (:func:`qat.prepare`): a typo must not go unnoticed.

In YAML::

    weight: {bits: 4, granularity: per_channel}
    activation: {bits: 8, signed: false, symmetric: false, observer: moving_average_minmax}
    rules:
      - names: "conv1|fc"          # first conv and classifier at 8 bits
        weight: {bits: 8}
      - types: [Embedding]
        weight: {granularity: per_group, group_size: 32}
    skip: ["head\\\\.aux.*"]

Example:
    >>> from qat import QuantRecipe
    >>> recipe = QuantRecipe.from_dict({"weight": {"bits": 4}, "rules": [{"names": "fc", "weight": {"bits": 8}}]})
    >>> recipe.rules[0].weight
    {'bits': 8}
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from qat.core.spec import Granularity, ObserverKind, QuantSpec, Role
from qat.errors import ConfigError, QATError
from qat.text_files import read_text

DEFAULT_WEIGHT = QuantSpec(bits=8, granularity=Granularity.PER_CHANNEL)
"""int8, symmetric, one scale per output channel."""
DEFAULT_ACTIVATION = QuantSpec(bits=8, signed=False, symmetric=False, observer=ObserverKind.MOVING_AVERAGE_MINMAX)
"""uint8, affine, one scale per tensor (the zero point lands on 0 after a ReLU: ORT's fast path)."""

SpecOverride = Mapping[str, Any] | None
OPERATORS = ("add", "mul", "concat", "pool", "activation")
"""Operators between layers whose operands and results a recipe's ``operators`` can quantize
(:mod:`qat.preparation.residuals`): additions, multiplications of two activations (a
squeeze-excite gate), concatenations, average pools, and activation functions (Hardswish,
Hardsigmoid, Sigmoid, SiLU, GELU, LeakyReLU)."""

BIAS_FORMATS = ("int32", "float")
"""How a quantized layer's bias is computed: ``int32`` as integer runtimes add it, or ``float``."""


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            suggestion = f" (did you mean `{hint[0]}`?)" if hint else ""
            raise ConfigError(f"{where}.{key}" if where else str(key), f"unknown key{suggestion}; allowed: {', '.join(allowed)}")


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping; got `{value!r}`")
    return value


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ConfigError(key, f"must be a string or a list of strings; got `{value!r}`")
    return tuple(items)


def _compile(pattern: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(key, f"`{pattern}` is not a valid regular expression: {err}") from None


SPEC_KEYS = tuple(f.name for f in dataclasses.fields(QuantSpec))


def spec_from(value: Any, key: str, base: QuantSpec) -> QuantSpec:
    """A spec from a QuantSpec, or from a mapping of the fields to change in ``base``."""
    if isinstance(value, QuantSpec):
        return value
    data = _mapping(value, key)
    _check_keys(data, SPEC_KEYS, key)
    try:
        return base.replace(**data)
    except ConfigError as err:
        raise err.under(key) from None


def _override(current: QuantSpec | None, change: SpecOverride, fallback: QuantSpec, key: str, role: Role) -> QuantSpec | None:
    """Apply one rule's override: None turns the quantizer off, {} keeps it, fields replace."""
    if change is None:
        return None
    if not change:
        return current
    spec = spec_from(change, key, current or fallback)
    try:
        spec.check_role(role)
    except ConfigError as err:
        raise err.under(key) from None
    return spec


@dataclass(frozen=True)
class LayerRule:
    """Change the specs of the layers whose type and name match.

    Args:
        names: regular expression, matched with ``re.fullmatch`` against the layer's
            fully-qualified name (``layer1.0.conv1``).
        types: layer type names (``Conv2d``, ``torch.nn.Linear``); any one may match.
        weight: fields to change in the weight spec; ``None`` leaves the weight float.
        activation: fields to change in the input spec; ``None`` leaves the input float.
    """

    names: str | None = None
    types: tuple[str, ...] = ()
    weight: SpecOverride = field(default_factory=dict)
    activation: SpecOverride = field(default_factory=dict)
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.names is None and not self.types:
            raise ConfigError("names", "a rule needs `names` (a regular expression), `types` (layer type names), or both")
        if self.names is not None:
            if not isinstance(self.names, str):
                raise ConfigError("names", f"must be a regular expression string; got `{self.names!r}`")
            object.__setattr__(self, "_pattern", _compile(self.names, "names"))
        object.__setattr__(self, "types", _string_list(self.types, "types"))
        for key in ("weight", "activation"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, QuantSpec):
                _check_keys(_mapping(value, key), SPEC_KEYS, key)
                object.__setattr__(self, key, dict(value))

    def matches(self, name: str, layer: nn.Module) -> bool:
        """True when ``layer`` (at ``name``) is selected by this rule."""
        if self.types:
            cls = type(layer)
            if cls.__name__ not in self.types and f"{cls.__module__}.{cls.__qualname__}" not in self.types:
                return False
        return self._pattern is None or self._pattern.fullmatch(name) is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain values; keys left at their defaults are omitted."""
        out: dict[str, Any] = {}
        if self.names is not None:
            out["names"] = self.names
        if self.types:
            out["types"] = list(self.types)
        for key in ("weight", "activation"):
            value = getattr(self, key)
            if value != {}:
                out[key] = value.to_dict() if isinstance(value, QuantSpec) else value
        return out

    def describe(self) -> str:
        """Short label for messages: ``names='conv1|fc', types=[Conv2d]``."""
        parts = [f"names={self.names!r}"] if self.names is not None else []
        if self.types:
            parts.append(f"types=[{', '.join(self.types)}]")
        return ", ".join(parts)


@dataclass(frozen=True)
class QuantRecipe:
    """What :func:`qat.prepare` quantizes, and with which specs.

    Args:
        weight: default weight spec (None: weights stay float unless a rule turns them on). A
            mapping changes fields of :data:`DEFAULT_WEIGHT` (``{bits: 4}`` is int4 per-channel).
        activation: default spec for layer inputs (None: weight-only quantization). A mapping
            changes fields of :data:`DEFAULT_ACTIVATION`.
        rules: ordered :class:`LayerRule` overrides.
        skip: regular expressions (``re.fullmatch`` on the fully-qualified name) of layers to
            leave float; each must match a layer that would otherwise be quantized.
        fold_bn: fold BatchNorm layers that directly follow a convolution (needs example inputs
            to find the pairs).
        residuals: also quantize both operands and the result of every addition of two
            activations (residual connections), where they are produced, so ONNX Runtime runs the
            additions and the layers feeding them on integer kernels (:mod:`qat.preparation.residuals`;
            needs example inputs and a per-tensor static activation spec). The same as listing
            ``add`` in ``operators``.
        operators: the kinds of operator between layers (from :data:`OPERATORS`) whose operands
            and results are quantized where they are produced, as ``residuals`` does for additions:
            ``[add, mul, concat, pool, activation]`` lets ONNX Runtime run a MobileNet's
            squeeze-excite, pools and the convolutions feeding its activations on integer kernels.
        bias: ``int32`` (default): a layer whose input and weight are quantized adds its bias as
            integer runtimes do, as int32 codes at input scale × weight scale, in training and in
            the exported graph (:mod:`qat.core.bias`); ``float``: biases stay float, for a runtime
            that adds them in float.
    """

    weight: QuantSpec | None = DEFAULT_WEIGHT
    activation: QuantSpec | None = DEFAULT_ACTIVATION
    rules: tuple[LayerRule, ...] = ()
    skip: tuple[str, ...] = ()
    fold_bn: bool = True
    residuals: bool = False
    operators: tuple[str, ...] = ()
    bias: str = "int32"
    _skip_patterns: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, base in (("weight", DEFAULT_WEIGHT), ("activation", DEFAULT_ACTIVATION)):
            spec = getattr(self, key)
            if spec is not None:
                spec = spec_from(spec, key, base)
                try:
                    spec.check_role(key)
                except ConfigError as err:
                    raise err.under(key) from None
                object.__setattr__(self, key, spec)
        if not isinstance(self.rules, (list, tuple)):
            raise ConfigError("rules", f"must be a list of rules; got `{self.rules!r}`")
        rules = []
        for i, rule in enumerate(self.rules):
            key = f"rules[{i}]"
            if not isinstance(rule, LayerRule):
                data = _mapping(rule, key)
                _check_keys(data, ("names", "types", "weight", "activation"), key)
                try:
                    rule = LayerRule(**data)
                except ConfigError as err:
                    raise err.under(key) from None
            _override(self.weight, rule.weight, DEFAULT_WEIGHT, f"{key}.weight", "weight")
            _override(self.activation, rule.activation, DEFAULT_ACTIVATION, f"{key}.activation", "activation")
            rules.append(rule)
        object.__setattr__(self, "rules", tuple(rules))
        skip = _string_list(self.skip, "skip")
        object.__setattr__(self, "skip", skip)
        object.__setattr__(self, "_skip_patterns", tuple(_compile(p, f"skip[{i}]") for i, p in enumerate(skip)))
        for key in ("fold_bn", "residuals"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(key, f"must be true or false; got `{getattr(self, key)!r}`")
        if self.bias not in BIAS_FORMATS:
            raise ConfigError("bias", f"must be one of {', '.join(BIAS_FORMATS)}; got `{self.bias!r}`")
        operators = _string_list(self.operators, "operators")
        unknown = [op for op in operators if op not in OPERATORS]
        if unknown:
            raise ConfigError(f"operators[{operators.index(unknown[0])}]", f"`{unknown[0]}` is not one of {', '.join(OPERATORS)}")
        object.__setattr__(self, "operators", operators)
        if self.quantized_operators and (self.activation is None or not self.activation.per_tensor_static):
            raise ConfigError("residuals" if self.residuals else "operators",
                              "needs a per-tensor activation spec with a fixed scale (not dynamic); "
                              f"the recipe's activation is {self.activation.describe() if self.activation else 'None'}")

    @property
    def quantized_operators(self) -> frozenset[str]:
        """The operator kinds whose operands and results are quantized (``residuals`` is ``add``)."""
        return frozenset(self.operators) | ({"add"} if self.residuals else set())

    # -- resolution -----------------------------------------------------------------------------

    def skipped_by(self, name: str) -> list[int]:
        """The indices of the skip patterns that match ``name``."""
        return [i for i, pattern in enumerate(self._skip_patterns) if pattern.fullmatch(name)]

    def skip_reason(self, name: str) -> str | None:
        """Why ``name`` is skipped (``skip[0] 'fc'``), or None."""
        matched = self.skipped_by(name)
        return f"skipped by recipe skip[{matched[0]}] {self.skip[matched[0]]!r}" if matched else None

    def specs_for(self, name: str, layer: nn.Module) -> tuple[QuantSpec | None, QuantSpec | None, list[int]]:
        """Weight spec, input spec and the indices of the rules that matched ``layer``."""
        weight, activation, matched = self.weight, self.activation, []
        for i, rule in enumerate(self.rules):
            if not rule.matches(name, layer):
                continue
            matched.append(i)
            try:
                weight = _override(weight, rule.weight, DEFAULT_WEIGHT, f"rules[{i}].weight", "weight")
                activation = _override(activation, rule.activation, DEFAULT_ACTIVATION, f"rules[{i}].activation", "activation")
            except ConfigError as err:
                raise ConfigError(err.key, f"{err.reason} (applied to layer `{name}`)") from None
        return weight, activation, matched

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> QuantRecipe:
        """Build from plain values (a parsed YAML / JSON mapping); errors name the bad key."""
        try:
            data = _mapping(data, "recipe")
            _check_keys(data, ("weight", "activation", "rules", "skip", "fold_bn", "residuals", "operators", "bias"), "")
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(err.key, err.reason, source) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> QuantRecipe:
        """Load a recipe file; a missing file or a YAML syntax error names the file and line."""
        path = Path(path)
        text = read_text(path, "recipe file")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise QATError(f"recipe file `{path}`{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        return cls.from_dict({} if data is None else data, source=str(path))

    @classmethod
    def coerce(cls, recipe: QuantRecipe | Mapping[str, Any] | str | os.PathLike[str] | None) -> QuantRecipe:
        """A recipe from a recipe, a mapping, a YAML path, or None (the default recipe)."""
        if recipe is None:
            return cls()
        if isinstance(recipe, QuantRecipe):
            return recipe
        if isinstance(recipe, Mapping):
            return cls.from_dict(recipe)
        if isinstance(recipe, (str, os.PathLike)):
            return cls.from_yaml(recipe)
        raise QATError(f"a recipe must be a QuantRecipe, a mapping or a YAML path; got {type(recipe).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values that :meth:`from_dict` turns back into an equal recipe."""

        return {
            "weight": self.weight.to_dict() if self.weight is not None else None,
            "activation": self.activation.to_dict() if self.activation is not None else None,
            "rules": [rule.to_dict() for rule in self.rules],
            "skip": list(self.skip),
            "fold_bn": self.fold_bn,
            # only when not the default: recipes (and checkpoints) from before the keys existed stay equal
            **({"residuals": True} if self.residuals else {}),
            **({"operators": list(self.operators)} if self.operators else {}),
            **({"bias": self.bias} if self.bias != "int32" else {}),
        }
