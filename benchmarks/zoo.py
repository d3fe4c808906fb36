"""Parity and integer-kernel coverage on the test zoo (tests/test_zoo.py), with each network's own
sensitivity to float rounding.

For every vision network of the zoo, built and trained exactly as the test does (random init,
BatchNorm statistics from float training-mode passes, int4 weights and uint8 inputs, calibrated,
two QAT steps, 64×64 inputs): how far PyTorch moves when its input moves by one part in a million
(:func:`qat.export.diagnose.rounding_sensitivity`, the largest of two batches × three draws, relative
to the largest output), how far ONNX Runtime is from PyTorch in each artifact (relative, two
batches) with int32 biases (the default) and, prepared the same way, with float biases (the
recipe's ``bias: float``, which ONNX Runtime quantizes on its own), whether the default is within
the default rtol, and the share of quantized layers the *ort* artifact runs on integer kernels,
with the kernels that run in float. The zoo's recipe quantizes every operator between layers
(``operators``); the share is also given for the same network with layer inputs quantized only.

Run:  python benchmarks/zoo.py [--models NAME ...] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import onnxruntime as ort
import torch
from results_md import cpu_description, write_block

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_zoo import VISION, VISION_RECIPE, _vision_model

import qat
from qat.export.diagnose import rounding_sensitivity
from qat.export.exporter import DEFAULT_RTOL


def _exported(name: str, recipe: dict, folder: Path):
    """The zoo network ``name`` prepared with ``recipe``, its rounding sensitivity, and its export (rtol 1: the
    figures are wanted whatever they are; the test judges them)."""
    model, batches = _vision_model(VISION[name], recipe)
    sensitivity = rounding_sensitivity(model, batches[4:6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qat.export.exporter.FloatFallbackWarning)
        result = qat.export_onnx(model, batches[4], folder / f"{name}.onnx", verification_inputs=[batches[5]], rtol=1.0)
    return sensitivity, result


def _relative(artifact) -> float:
    return artifact.parity.max_abs_diff / artifact.parity.output_scale


def measure(name: str, folder: Path) -> str:
    _, inputs_only = _exported(name, {**VISION_RECIPE, "operators": []}, folder)
    _, floating_bias = _exported(name, {**VISION_RECIPE, "bias": "float"}, folder)
    sensitivity, result = _exported(name, VISION_RECIPE, folder)
    relative = {kind: _relative(artifact) for kind, artifact in result.artifacts.items()}
    within = "yes" if max(relative.values()) <= DEFAULT_RTOL else "no"
    kernels = result.ort.kernels
    floating = Counter(kernel for kernel in kernels.values() if kernel.startswith("float"))
    in_float = ", ".join(f"{count} {kernel.removeprefix('float ')}" for kernel, count in floating.most_common()) or "none"
    row = (f"| {name} | {sensitivity:.2%} | {relative['device']:.2%} | {relative['ort']:.2%} | {within} | "
           f"{_relative(floating_bias.device):.2%} | {_relative(floating_bias.ort):.2%} | "
           f"{result.ort.integer_kernel_share:.0%} ({len(kernels) - sum(floating.values())} of {len(kernels)}) | "
           f"{inputs_only.ort.integer_kernel_share:.0%} | {in_float} |")
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(VISION), default=list(VISION))
    parser.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    lines = ["| network | PyTorch vs itself, input ×(1 ± 1e-6) | ORT vs PyTorch, device | ORT vs PyTorch, ort | within 5 % | "
             "with float biases: device | with float biases: ort | ort layers on integer kernels | the same, inputs only | "
             "layers in float (ORT operator) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            lines.append(measure(name, Path(folder)))
    footer = (f"Command: `python benchmarks/zoo.py {' '.join(argv if argv is not None else sys.argv[1:])}`; {cpu_description()}, "
              f"onnxruntime {ort.__version__}, torch {torch.__version__}; differences relative to the largest output, the largest "
              f"over two batches of 8; {datetime.date.today():%Y-%m-%d}.")
    print(footer)
    if args.write:
        write_block("zoo", [*lines, "", footer])


if __name__ == "__main__":
    main()
