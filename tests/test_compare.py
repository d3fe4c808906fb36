"""`qat compare` against the shipped baseline: latency is reported everywhere but gated only when asked,
since a baseline measured on another machine says nothing about this one's speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qat.app.cli import main
from qat.app.compare import Limits, compare
from qat.app.results import RESULTS_VERSION, load_results

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines" / "resnet18_mnist5k_w4a8.json"


@pytest.fixture
def slower_machine(tmp_path) -> Path:
    """The baseline's run as another machine measures it: same figures, latency ×14 (+1300 %)."""
    results = json.loads(BASELINE.read_text())
    for entry in results["artifacts"].values():
        entry["latency_ms"] *= 14
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return path


def test_the_ci_snippet_passes_on_another_machine(slower_machine, capsys):
    assert main(["compare", str(slower_machine), "--baseline", str(BASELINE), "--max-metric-drop", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "no regression" in out and "not gated" in out and "+1300.0 %" in out


def test_latency_is_gated_when_asked(slower_machine, capsys):
    assert main(["compare", str(slower_machine), "--baseline", str(BASELINE), "--max-latency-increase", "25"]) == 1
    assert "regressed: device: ORT latency ms, ort: ORT latency ms" in capsys.readouterr().out


def test_latency_checks_report_without_failing_by_default(slower_machine):
    checks = [c for c in compare(load_results(slower_machine), load_results(BASELINE)) if "latency" in c.measure]
    assert len(checks) == 2 and all(c.ok and not c.gated and c.limit == "not gated" for c in checks)
    gated = [c for c in compare(load_results(slower_machine), load_results(BASELINE), Limits(max_latency_increase=1400))
             if "latency" in c.measure]
    assert all(c.ok and c.gated and c.limit == "≤ +1400 %" for c in gated)


def test_the_schema_version_is_the_writers():
    assert load_results(BASELINE)["version"] == RESULTS_VERSION
