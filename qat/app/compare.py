"""`qat compare`: gate a run's ``results.json`` against a baseline's, for CI/CD.

Checks, each against a limit given on the command line (defaults in :class:`Limits`):

- **quality**: the QAT model's test metric (accuracy, perplexity, cosine …) may be worse than the
  baseline's by at most ``max_metric_drop`` percent of the baseline value (the metric's own
  direction: lower perplexity is better);
- **ONNX Runtime parity**, per artifact: top-1 agreement with PyTorch may drop by at most
  ``max_agreement_drop`` points; the ONNX Runtime perplexity (language models) obeys the quality
  limit; and the artifact must still pass verification;
- **size**, per artifact: at most ``max_size_increase`` percent larger;
- **latency**, per artifact: reported, and gated only when ``max_latency_increase`` is given (at
  most that many percent slower): latency depends on the machine, so gate it only against a
  baseline measured on the same one.

Example (a CI step)::

    qat run recipes/vision/resnet18_mnist5k_w4a8.yaml --out runs/pr
    qat compare runs/pr/results.json --baseline baseline/results.json --max-metric-drop 0.5
    # same machine as the baseline: gate latency too
    qat compare runs/pr/results.json --baseline baseline/results.json --max-latency-increase 25
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from qat.app.results import format_metric
from qat.errors import QATError


@dataclass(frozen=True)
class Limits:
    """How much worse a run may be than its baseline before ``qat compare`` fails it; each limit is
    a finite number ≥ 0, or None for latency (reported, not gated)."""

    max_metric_drop: float = 1.0
    """percent of the baseline's metric value"""
    max_agreement_drop: float = 0.5
    """points of top-1 agreement between ONNX Runtime and PyTorch"""
    max_size_increase: float = 1.0
    """percent of the baseline artifact's bytes"""
    max_latency_increase: float | None = None
    """percent of the baseline artifact's ONNX Runtime latency; None: latency is not gated (it
    depends on the machine, and baselines often come from another one)"""

    def __post_init__(self) -> None:
        # nan would fail every check (nan ≤ x is False) and a negative limit every unchanged run
        for name, value in vars(self).items():
            if value is None and name == "max_latency_increase":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise QATError(f"--{name.replace('_', '-')} must be a finite number ≥ 0; got `{value}`")


@dataclass(frozen=True)
class Check:
    """One line of the comparison."""

    measure: str
    baseline: str
    current: str
    change: str
    limit: str
    ok: bool
    gated: bool = True
    """False for a figure that is reported only (latency without ``max_latency_increase``)."""


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
        gate = limits.max_latency_increase
        checks.append(Check(f"{kind}: ORT latency ms", f"{base['latency_ms']:.2f}", f"{entry['latency_ms']:.2f}", f"{slower:+.1f} %",
                            "not gated" if gate is None else f"≤ +{gate:g} %", gate is None or slower <= gate, gated=gate is not None))
    return checks


def checks_table(checks: list[Check], title: str) -> Table:
    """The comparison side by side, as a rich table."""
    table = Table(title=title, title_justify="left")
    for column in ("measure", "baseline", "current", "change", "limit", ""):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for check in checks:
        table.add_row(check.measure, check.baseline, check.current, check.change, check.limit,
                      "[bold red]REGRESSED[/]" if not check.ok else "[green]ok[/]" if check.gated else "")
    return table
