"""`qat compare`: gate a run's ``results.json`` against a baseline's, for CI/CD.

Checks, each against a limit given on the command line (defaults in :class:`Limits`):

- **quality**: the QAT model's test metric (accuracy, perplexity, cosine …) may be worse than the
  baseline's by at most ``max_metric_drop`` percent of the baseline value (the metric's own
  direction: lower perplexity is better);
- **ONNX Runtime parity**, per artifact: top-1 agreement with PyTorch may drop by at most
  ``max_agreement_drop`` points; the ONNX Runtime perplexity (language models) obeys the quality
  limit; and the artifact must still pass verification;
- **size**, per artifact: at most ``max_size_increase`` percent larger;
- **latency**, per artifact: at most ``max_latency_increase`` percent slower (compare runs from
  the same machine: the latency is the median of timed runs, but machines differ).

Example (a CI step)::

    qat run recipes/vision/resnet18_mnist5k_w4a8.yaml --out runs/pr
    qat compare runs/pr/results.json --baseline baseline/results.json --max-metric-drop 0.5
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from rich.table import Table

from qat.errors import QATError
from qat.text_files import read_text

RESULTS_VERSION = 1
"""Version of the ``results.json`` layout that :func:`qat.app.run.run_recipe` writes."""


def format_metric(name: str, value: float | None) -> str:
    """Accuracies in percent with one decimal, other metrics with four significant digits."""
    if value is None:
        return "–"
    if name.endswith("acc") or name.endswith("accuracy"):
        return f"{100 * value:.1f} %"
    return f"{value:.4g}"


_NUMBER = {"type": "number"}
_ARTIFACT = {
    "type": "object",
    "required": ["bytes", "verified", "top1_agreement", "perplexity", "latency_ms"],
    "properties": {"bytes": {"type": "integer"}, "verified": {"type": "boolean"}, "latency_ms": _NUMBER,
                   "top1_agreement": {"type": ["number", "null"]}, "perplexity": {"type": ["object", "null"]}},
}
RESULTS_SCHEMA = {
    "type": "object",
    "required": ["version", "recipe", "metric", "stages", "artifacts"],
    "properties": {
        "version": {"const": RESULTS_VERSION},
        "metric": {"type": "object", "required": ["name", "higher_is_better"]},
        "stages": {"type": "object", "required": ["float", "ptq", "qat"],
                   "additionalProperties": {"type": "object", "required": ["metric"], "properties": {"metric": _NUMBER}}},
        "artifacts": {"type": "object", "minProperties": 1, "additionalProperties": _ARTIFACT},
    },
}
"""What :mod:`qat.app.compare` needs of a ``results.json`` (:func:`qat.app.run.run_recipe` writes more)."""


@dataclass(frozen=True)
class Limits:
    """How much worse a run may be than its baseline before ``qat compare`` fails it; each limit is
    a finite number ≥ 0."""

    max_metric_drop: float = 1.0
    """percent of the baseline's metric value"""
    max_agreement_drop: float = 0.5
    """points of top-1 agreement between ONNX Runtime and PyTorch"""
    max_size_increase: float = 1.0
    """percent of the baseline artifact's bytes"""
    max_latency_increase: float = 25.0
    """percent of the baseline artifact's ONNX Runtime latency"""

    def __post_init__(self) -> None:
        # nan would fail every check (nan ≤ x is False) and a negative limit every unchanged run
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise QATError(f"--{name.replace('_', '-')} must be a finite number ≥ 0; got `{value}`")


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``results.json``, checked against :data:`RESULTS_SCHEMA`; errors name the file and key."""
    path = Path(path)
    if not path.exists():
        raise QATError(f"`{path}` does not exist")
    try:
        results = json.loads(read_text(path, "results file"))
    except json.JSONDecodeError as error:
        raise QATError(f"`{path}` is not JSON: {error}") from None
    try:
        jsonschema.validate(results, RESULTS_SCHEMA)
    except jsonschema.ValidationError as error:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise QATError(f"`{path}` is not a qat run results file: at `{where}`: {error.message}") from None
    return results


@dataclass(frozen=True)
class Check:
    """One line of the comparison."""

    measure: str
    baseline: str
    current: str
    change: str
    limit: str
    ok: bool


def _percent_change(baseline: float, current: float) -> float:
    return 100.0 * (current - baseline) / abs(baseline) if baseline else (0.0 if current == baseline else float("inf"))


def _quality(measure: str, name: str, higher: bool, baseline: float, current: float, limit: float) -> Check:
    change = _percent_change(baseline, current)
    worse = -change if higher else change
    return Check(measure, format_metric(name, baseline), format_metric(name, current), f"{change:+.2f} %", f"≤ {limit:g} % worse",
                 worse <= limit)


def compare(current: dict[str, Any], baseline: dict[str, Any], limits: Limits = Limits()) -> list[Check]:
    """Every check of ``current`` against ``baseline``; a run passes when all are ``ok``."""
    name, higher = baseline["metric"]["name"], baseline["metric"]["higher_is_better"]
    if current["metric"]["name"] != name:
        raise QATError(f"the runs measure different metrics: `{current['metric']['name']}` vs the baseline's `{name}`")
    checks = [_quality(f"QAT {name}", name, higher, baseline["stages"]["qat"]["metric"], current["stages"]["qat"]["metric"],
                       limits.max_metric_drop)]
    for kind, base in baseline["artifacts"].items():
        entry = current["artifacts"].get(kind)
        if entry is None:
            checks.append(Check(f"{kind} artifact", "present", "missing", "", "present", False))
            continue
        checks.append(Check(f"{kind}: verified", str(base["verified"]), str(entry["verified"]), "", "True", entry["verified"]))
        if base["top1_agreement"] is not None and entry["top1_agreement"] is not None:
            drop = 100.0 * (base["top1_agreement"] - entry["top1_agreement"])
            checks.append(Check(f"{kind}: ORT = PyTorch top-1", f"{100 * base['top1_agreement']:.2f} %",
                                f"{100 * entry['top1_agreement']:.2f} %", f"{-drop:+.2f} pt",
                                f"≤ {limits.max_agreement_drop:g} pt drop", drop <= limits.max_agreement_drop))
        if base["perplexity"] and entry["perplexity"]:
            checks.append(_quality(f"{kind}: ORT perplexity", "ppl", False, base["perplexity"]["onnx"], entry["perplexity"]["onnx"],
                                   limits.max_metric_drop))
        growth = _percent_change(base["bytes"], entry["bytes"])
        checks.append(Check(f"{kind}: bytes", f"{base['bytes']:,}", f"{entry['bytes']:,}", f"{growth:+.2f} %",
                            f"≤ +{limits.max_size_increase:g} %", growth <= limits.max_size_increase))
        slower = _percent_change(base["latency_ms"], entry["latency_ms"])
        checks.append(Check(f"{kind}: ORT latency ms", f"{base['latency_ms']:.2f}", f"{entry['latency_ms']:.2f}", f"{slower:+.1f} %",
                            f"≤ +{limits.max_latency_increase:g} %", slower <= limits.max_latency_increase))
    return checks


def checks_table(checks: list[Check], title: str) -> Table:
    """The comparison side by side, as a rich table."""
    table = Table(title=title, title_justify="left")
    for column in ("measure", "baseline", "current", "change", "limit", ""):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for check in checks:
        table.add_row(check.measure, check.baseline, check.current, check.change, check.limit,
                      "[green]ok[/]" if check.ok else "[bold red]REGRESSED[/]")
    return table
