"""The ``results.json`` of ``qat run``: its layout version and schema, its writer and its reader.

:func:`qat.app.run.run_recipe` writes it (with ``results.md``, the same table in markdown) through
:func:`write_results`; ``qat compare`` (:mod:`qat.app.compare`) and the benchmarks read it through
:func:`load_results`, which checks it against :data:`RESULTS_SCHEMA`. Light on imports, so
``qat compare`` starts without loading Lightning or ONNX Runtime.

Example:
    >>> format_metric("test_acc", 0.9744), format_metric("test_ppl", 12.3456)
    ('97.4 %', '12.35')
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
from rich.table import Table

from qat.atomic import write_atomic
from qat.errors import QATError
from qat.text_files import read_json

RESULTS_VERSION = 1
"""Version of the ``results.json`` layout that :func:`run_recipe` writes (:func:`load_results` checks it)."""


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
"""What the readers need of a ``results.json`` (:func:`write_results` writes more)."""


def write_results(folder: Path, results: dict[str, Any]) -> None:
    """``results.json`` and ``results.md`` in ``folder``, each written whole or not at all."""
    write_atomic(folder / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(folder / "results.md", results_markdown(results))


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``results.json``, checked against :data:`RESULTS_SCHEMA`; errors name the file and key."""
    results = read_json(path, "results file")
    try:
        jsonschema.validate(results, RESULTS_SCHEMA)
    except jsonschema.ValidationError as error:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise QATError(f"`{path}` is not a qat run results file: at `{where}`: {error.message}") from None
    return results


def _rows(results: dict[str, Any], detailed: bool) -> tuple[list[str], list[list[str]]]:
    """The results table as cells: one row per stage, the artifacts' figures on the QAT rows;
    ``detailed`` adds the max |ORT − PyTorch| and kernel columns (markdown)."""
    metric, stages = results["metric"]["name"], results["stages"]
    float_bytes = stages["float"]["bytes"]
    header = ["model", metric, "MB", "ORT = PyTorch", "ORT ms", "integer layers"]
    if detailed:
        header[3:3] = ["× float size"]
        header[5:5] = ["max abs ORT − PyTorch"]
    rows = []
    for name, size in (("float", float_bytes), ("PTQ", None)):
        row = [name, format_metric(metric, stages[name.lower()]["metric"]), f"{size / 1e6:.2f}" if size else "", "", "", ""]
        if detailed:
            row[3:3] = ["1.000" if size else ""]
            row[5:5] = [""]
        rows.append(row)
    for kind, entry in results["artifacts"].items():
        row = [f"QAT, {kind}", format_metric(metric, stages["qat"]["metric"]), f"{entry['bytes'] / 1e6:.2f}", ort_agreement(entry),
               f"{entry['latency_ms']:.1f}", f"{entry['layers'] - len(entry['float_layers'])} of {entry['layers']}"]
        if detailed:
            row[3:3] = [f"{entry['bytes'] / float_bytes:.3f}"]
            row[5:5] = [f"{entry['max_abs_diff']:.3g} of {entry['output_scale']:.3g}"]
        rows.append(row)
    return header, rows


def ort_agreement(entry: dict[str, Any]) -> str:
    """How an artifact's ONNX Runtime outputs agree with PyTorch, by the task's own measure:
    top-1 agreement, perplexity, or embedding cosine ("" for plain tensors)."""
    if entry["top1_agreement"] is not None:
        return f"{100 * entry['top1_agreement']:.1f} % top-1"
    if entry["perplexity"]:
        return f"ppl Δ {entry['perplexity']['delta']:+.3g}"  # ONNX Runtime − PyTorch
    if entry.get("embedding"):  # results written before embeddings had their own measure have none
        return f"cosine {entry['embedding']['cosine_mean']:.4f} (min {entry['embedding']['cosine_min']:.3f})"
    return ""


def results_table(results: dict[str, Any]) -> Table:
    """The results as a rich table (what ``qat run`` prints)."""
    header, rows = _rows(results, detailed=False)
    table = Table(title=f"{Path(results['recipe']).stem}: float → PTQ → QAT → ONNX, test split", title_justify="left")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    stages = results["stages"]
    table.caption = (f"ORT = PyTorch: on {results['verified_inputs']} test inputs; ORT ms: {_latency_note(results['artifacts'])}; "
                     f"integer layers: run on ONNX Runtime's integer (or n-bit) kernels. float {stages['float']['seconds']:.0f} s, "
                     f"PTQ {stages['ptq']['seconds']:.0f} s, QAT + export {stages['qat']['seconds']:.0f} s")
    return table


def _latency_note(artifacts: dict[str, Any]) -> str:
    """What the latency column measures: a batch's median run, or (an onnxruntime-genai folder) the
    time per new token of its generation loop at batch 1."""
    notes = []
    for kind, entry in artifacts.items():
        note = f"{kind}, {entry['latency_unit']} at batch 1" if "latency_unit" in entry else f"batch of {entry['latency_batch']}, median"
        if note not in notes:
            notes.append(note)
    return ", ".join(notes)


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table with the machine and date (what ``results.md`` holds)."""
    header, rows = _rows(results, detailed=True)
    lines = [f"# {Path(results['recipe']).stem}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    machine = results["machine"]
    lines += ["", f"Recipe `{results['recipe']}`{' with ' + ' '.join(results['overrides']) if results['overrides'] else ''}; "
              f"{results['created']}; {machine['processor']} × {machine['cpu_count']} ({machine['accelerator']}), torch "
              f"{machine['torch']}, onnxruntime {machine['onnxruntime']}; {results['seconds']:.0f} s in all.", ""]
    return "\n".join(lines)
