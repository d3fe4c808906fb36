"""The accuracy tables of benchmarks/RESULTS.md: the shipped recipes at full length, through `qat run`.

Each table row is one `qat.pipeline.run_recipe` (float → PTQ → QAT → export → verification).
Rows of one table share one float model: the first row trains it, the others start from its
``float/float_weights.pt`` (``RunSettings.float_weights``), so they differ only in quantization.
Bit-width variants are the shipped recipe with its QuantizationAwareTraining recipe's bits
changed, written next to the results.

Run:  python benchmarks/recipes.py [--tables vision mobilenet vit llm minilm] [--out runs/benchmarks]

It rewrites the part of benchmarks/RESULTS.md between ``<!-- recipes:begin -->`` and
``<!-- recipes:end -->`` with the tables, the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from qat.compare import format_metric
from qat.pipeline import RunSettings, run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


@dataclass
class Row:
    label: str
    weight: dict | None = None       # changes to the QAT recipe's default weight spec
    activation: dict | None = None   # changes to its default activation spec


@dataclass
class TableSpec:
    title: str
    recipe: str
    rows: list[Row]
    overrides: list[str] = field(default_factory=list)
    qat_fraction: float = 0.5
    note: str = ""


TABLES = {
    "vision": TableSpec(
        "ResNet-18 on MNIST-5k (per-channel weights; first conv 7-bit, as in the recipe)",
        "vision/resnet18_mnist5k_w4a8.yaml",
        [Row("W8A8", {"bits": 8}, {"bits": 8}), Row("W4A8", {"bits": 4}, {"bits": 8}), Row("W4A4", {"bits": 4}, {"bits": 4}),
         Row("W3A4", {"bits": 3}, {"bits": 4}), Row("W2A8", {"bits": 2}, {"bits": 8})],
        overrides=["--trainer.max_epochs=6"],
        note="Targets (issue 5): QAT within 0.5 points of float at W4A8 and W4A4, within 2 points at W2A8.",
    ),
    "mobilenet": TableSpec(
        "MobileNetV3-small on MNIST-5k (depthwise convolutions)",
        "vision/mobilenetv3_small_mnist5k_w8a8.yaml",
        [Row("W8A8", {"bits": 8}, {"bits": 8}), Row("W4A8", {"bits": 4}, {"bits": 8})],
        note="Target (issue 5): QAT within 1 point of float at W4A8.",
    ),
    "vit": TableSpec("ViT-tiny (timm) on MNIST-5k", "vision/vit_tiny_mnist5k_w4a8.yaml", [Row("W4A8")]),
}


def variant(recipe: Path, row: Row, folder: Path) -> Path:
    """The recipe with its quantization bits changed as ``row`` says, written into ``folder``."""
    config = yaml.safe_load(recipe.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("QuantizationAwareTraining"):
            spec = callback.setdefault("init_args", {}).setdefault("recipe", {})
            for role, change in (("weight", row.weight), ("activation", row.activation)):
                if change:
                    spec[role] = {**(spec.get(role) or {}), **change}
        if callback["class_path"].endswith("ONNXExport"):
            callback.setdefault("init_args", {})["path"] = f"{recipe.stem}_{row.label.lower()}.onnx"
    path = folder / f"{recipe.stem}_{row.label.lower()}.yaml"
    path.write_text(f"# {row.label} variant of {recipe.relative_to(ROOT)}, written by benchmarks/recipes.py\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def run_table(spec: TableSpec, out: Path) -> tuple[list[str], dict]:
    """Markdown lines of one table (float, then per row PTQ / QAT / ONNX Runtime figures) and the machine it ran on."""
    folder = out / Path(spec.recipe).stem
    folder.mkdir(parents=True, exist_ok=True)
    float_weights, lines = None, []
    for row in spec.rows:
        path = variant(RECIPES / spec.recipe, row, folder)
        settings = RunSettings(output_dir=folder / row.label.lower(), qat_fraction=spec.qat_fraction, float_weights=float_weights)
        results = run_recipe(path, settings, spec.overrides)
        float_weights = float_weights or results["stages"]["float"]["weights"]
        metric, stages, ort_entry = results["metric"]["name"], results["stages"], results["artifacts"]["ort"]
        if not lines:
            lines = [f"**{spec.title}** — `{spec.recipe}` {' '.join(spec.overrides)}, QAT {spec.qat_fraction:g}× the float run", "",
                     f"| format | float {metric} | PTQ | QAT | QAT − float | device MB | ort MB | ORT = PyTorch | ORT ms |",
                     "|---|---|---|---|---|---|---|---|---|"]
        agreement = (f"{100 * ort_entry['top1_agreement']:.1f} %" if ort_entry["top1_agreement"] is not None
                     else f"ppl Δ {ort_entry['perplexity']['delta']:+.3g}" if ort_entry["perplexity"] else "")
        gap = stages["qat"]["metric"] - stages["float"]["metric"]
        cells = [row.label, *(format_metric(metric, stages[k]["metric"]) for k in ("float", "ptq", "qat")),
                 f"{100 * gap:+.1f} pt" if metric.endswith("acc") else f"{gap:+.4g}",
                 f"{results['artifacts']['device']['bytes'] / 1e6:.2f}", f"{ort_entry['bytes'] / 1e6:.2f}", agreement,
                 f"{ort_entry['latency_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if spec.note:
        lines += ["", spec.note]
    return [*lines, ""], results["machine"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=sorted(TABLES))
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args()
    started = datetime.datetime.now()
    lines = []
    for name in args.tables:
        table, machine = run_table(TABLES[name], args.out)
        lines += table
    lines += [f"Command: `python benchmarks/recipes.py --tables {' '.join(args.tables)}`; {machine['processor']} × "
              f"{machine['cpu_count']} ({machine['accelerator']}), "
              f"torch {torch.__version__}; {started:%Y-%m-%d}, {(datetime.datetime.now() - started).total_seconds() / 60:.0f} min. "
              "Per-run tables (with max |ORT − PyTorch| and kernels): `<out>/<recipe>/<format>/results.md`."]
    text = RESULTS.read_text()
    begin, end = "<!-- recipes:begin -->", "<!-- recipes:end -->"
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    text = text[: text.index(begin)] + block + text[text.index(end) + len(end):] if begin in text else text + "\n" + block + "\n"
    RESULTS.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
