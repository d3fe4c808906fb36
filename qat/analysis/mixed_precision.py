"""`qat.mixed_precision`: per-layer weight bit widths that cost the least under a size budget.

From a :class:`~qat.analysis.sensitivity.SensitivityTable`, choose one measured bit width per layer so the
model fits ``budget_bytes`` and the summed cost is smallest. The cost of a layer at ``b`` bits is,
by ``objective``:

- ``metric``: its metric loss (floored at 0), plus a millionth of its output noise to break ties:
  an evaluation set moves in steps (1 image in 500 is 0.2 points), and many layers lose nothing
  measurable at 4 bits or even 2;
- ``output_noise``: the noise it adds to the model output, ``10^(−SQNR/10)`` (the output's
  noise-to-signal power; independent errors add).

``auto`` is ``metric`` when the table has one. Summing assumes the layers' effects add up, which
holds while each is small, the regime a budget search is for.

The search is exact up to a byte grid: a multiple-choice knapsack solved by dynamic programming
over the bytes above the smallest choice, in at most 8,192 steps, with every layer's bytes rounded
up to the grid, so the result never exceeds the budget.

The result carries a recipe (the measured recipe plus one rule per bit width naming its layers)
that :func:`qat.prepare`, the callback and the CLI accept, and can write it as YAML.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qat.analysis.sensitivity import SensitivityTable
from qat.atomic import write_atomic
from qat.errors import QATError

OBJECTIVES = ("auto", "metric", "output_noise")
TIE_BREAK = 1e-6
"""Weight of the output noise in the ``metric`` objective: far below any metric step."""
GRID_STEPS = 8192
"""Byte-grid resolution of the search: the budget's spare bytes are split into at most this many steps."""


@dataclass(frozen=True)
class MixedPrecision:
    """The chosen bit width per layer, what it costs, and the recipe that applies it."""

    bits: dict[str, int]
    model_bytes: int
    budget_bytes: int
    predicted_cost: float
    """Summed layer costs: metric loss (metric units, plus the tie-break), or output noise power relative to the signal."""
    objective: str
    """``metric`` or ``output_noise``: what :attr:`predicted_cost` sums."""
    recipe: dict[str, Any]

    @property
    def predicted_sqnr_db(self) -> float | None:
        """The model output's predicted SQNR in dB, for the ``output_noise`` objective."""
        if self.objective != "output_noise":
            return None
        return math.inf if self.predicted_cost == 0 else -10 * math.log10(self.predicted_cost)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :attr:`recipe` as a YAML recipe file (written to a temporary name, then renamed)."""
        return write_atomic(path, yaml.safe_dump(self.recipe, sort_keys=False), make_parents=True)


def layer_cost(table: SensitivityTable, layer: str, bits: int, objective: str = "auto") -> float:
    """What one layer at ``bits`` costs in the search (see the module docstring)."""
    row = table.get(layer, bits)
    noise = 0.0 if math.isinf(row.output_sqnr_db) else 10 ** (-row.output_sqnr_db / 10)
    if _resolve(table, objective) == "output_noise":
        return noise
    return max(float(row.loss), 0.0) + TIE_BREAK * noise  # a layer that gained by chance costs only its noise


def _resolve(table: SensitivityTable, objective: str) -> str:
    if objective not in OBJECTIVES:
        raise QATError(f"objective: `{objective}` is not one of {', '.join(OBJECTIVES)}")
    if objective == "auto":
        return "metric" if table.float_metric is not None else "output_noise"
    if objective == "metric" and table.float_metric is None:
        raise QATError("objective: `metric` needs a table measured with `evaluate`; this one has output SQNR only")
    return objective


def recipe_with_bits(recipe: dict[str, Any], bits: dict[str, int]) -> dict[str, Any]:
    """``recipe`` plus one rule per bit width naming its layers (exact names, regex-escaped).

    Example:
        >>> recipe_with_bits({"weight": {"bits": 4}}, {"conv1": 8, "fc": 8, "layer1.0.conv1": 4})["rules"]
        [{'names': 'conv1|fc', 'weight': {'bits': 8}}, {'names': 'layer1\\\\.0\\\\.conv1', 'weight': {'bits': 4}}]
    """
    rules = list(recipe.get("rules", []))
    for b in sorted(set(bits.values()), reverse=True):
        names = "|".join(re.escape(layer) for layer, chosen in bits.items() if chosen == b)
        rules.append({"names": names, "weight": {"bits": b}})
    return {**recipe, "rules": rules}


def mixed_precision(table: SensitivityTable, budget_bytes: int, objective: str = "auto") -> MixedPrecision:
    """The per-layer bit widths (among the table's) of least summed cost within ``budget_bytes``.

    ``budget_bytes`` is the whole model's size: quantized weights with their scales, plus every
    other parameter in float (:attr:`SensitivityTable.other_bytes`). ``objective``: ``auto``,
    ``metric`` or ``output_noise`` (module docstring).

    Example:
        >>> import torch, qat
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> table = qat.sensitivity(net, {"weight": {"bits": 8}}, [torch.randn(64, 64)], bits=(8, 4), progress=False)
        >>> choice = qat.mixed_precision(table, table.model_bytes({"0": 4, "2": 8}))
        >>> choice.model_bytes <= choice.budget_bytes, sorted(choice.bits.values())
        (True, [4, 8])
    """
    objective = _resolve(table, objective)
    layers, options = table.layers, table.bits
    cost = np.array([[layer_cost(table, layer, b, objective) for b in options] for layer in layers])  # (L, B)
    size = np.array([[table.get(layer, b).weight_bytes for b in options] for layer in layers], dtype=np.int64)
    smallest = int(table.other_bytes + size.min(1).sum())
    if budget_bytes < smallest:
        raise QATError(f"budget_bytes: {budget_bytes:,} is below the smallest model these bit widths give, "
                       f"{smallest:,} bytes (every layer at {min(options)} bits)")
    spare = budget_bytes - smallest
    unit = max(1, math.ceil(spare / GRID_STEPS))
    steps = spare // unit
    extra = np.ceil((size - size.min(1, keepdims=True)) / unit).astype(np.int64)  # rounded up: never over budget
    best = np.zeros(steps + 1)  # best[c]: least cost of the layers so far within c grid steps
    picks = np.zeros((len(layers), steps + 1), dtype=np.int64)
    for i in range(len(layers)):
        candidates = np.full((len(options), steps + 1), np.inf)
        for j in range(len(options)):
            if extra[i, j] <= steps:
                candidates[j, extra[i, j]:] = best[: steps + 1 - extra[i, j]] + cost[i, j]
        picks[i] = candidates.argmin(0)
        best = candidates.min(0)
    chosen, c = {}, steps
    for i in reversed(range(len(layers))):
        j = int(picks[i, c])
        chosen[layers[i]] = options[j]
        c -= int(extra[i, j])
    chosen = {layer: chosen[layer] for layer in layers}
    total = table.model_bytes(chosen)
    predicted = float(sum(layer_cost(table, k, v, objective) for k, v in chosen.items()))
    return MixedPrecision(chosen, total, int(budget_bytes), predicted, objective, recipe_with_bits(table.recipe, chosen))
