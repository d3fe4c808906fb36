"""Size of the calibration sidecar next to its model, for a small Llama with int4 per-group weights.

The model is recipes/llm/llama_stdlib_w4g32.yaml's (4 layers × 256, vocabulary 512, int4 weights
per group of 32, dynamic int8 per-token activations), randomly initialised and calibrated on
random tokens: the sizes depend on the tensor shapes, not on training. For each artifact it prints
``sidecar bytes / model bytes``.

Usage:
    python benchmarks/sidecar_size.py                    # this checkout; prints a table
    python benchmarks/sidecar_size.py --baseline COMMIT   # also the package as of COMMIT, and writes
                                                          # the `sidecar_size` block of RESULTS.md

``--baseline`` extracts the commit with ``git archive`` into a temporary folder and runs this same
script there with ``PYTHONPATH`` pointing at it, so both rows come from one model and one command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 768, "vocab_size": 512, "max_position_embeddings": 256}
RECIPE = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 32},
          "activation": {"granularity": "per_token", "signed": True, "symmetric": True}}


def measure() -> dict[str, dict[str, int]]:
    """Export the model once; ``{artifact: {"model": bytes, "sidecar": bytes}}``."""
    import qat
    from qat.app.tasks import CausalLanguageModel

    torch.manual_seed(0)
    module = qat.prepare(CausalLanguageModel(MODEL), RECIPE)
    with torch.no_grad():
        for _ in range(2):
            module(torch.randint(0, MODEL["vocab_size"], (4, 32)))
    inputs = {"input_ids": torch.randint(0, MODEL["vocab_size"], (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = qat.export_onnx(module.eval(), inputs, Path(folder) / "llama.onnx")
        return {kind: {"model": a.path.stat().st_size, "sidecar": a.qparams_path.stat().st_size} for kind, a in result.artifacts.items()}


def measure_at(commit: str) -> dict[str, dict[str, int]]:
    """:func:`measure` with the ``qat`` package as of ``commit``."""
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": folder}
        out = subprocess.run([sys.executable, __file__, "--json"], cwd=folder, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def rows(label: str, sizes: dict[str, dict[str, int]]) -> list[str]:
    return [f"| {label} | {kind} | {s['model'] / 1e6:.2f} MB | {s['sidecar'] / 1e6:.3f} MB | {s['sidecar'] / s['model']:.1%} |"
            for kind, s in sizes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a git commit to measure too; writes the RESULTS.md block")
    parser.add_argument("--json", action="store_true", help="print the sizes as one JSON line (used by --baseline)")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure()))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_md import cpu_description, write_block

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True).stdout.strip()
    table = ["| code | artifact | model | sidecar | sidecar / model |", "|---|---|---|---|---|"]
    if args.baseline:
        table += rows(f"before ({args.baseline})", measure_at(args.baseline))
    table += rows(f"this checkout ({commit}{' with uncommitted changes' if changed else ''})", measure())
    print("\n".join(table))
    if args.baseline:
        write_block("sidecar_size", [
            "## Calibration sidecar size (LLM, int4 per-group weights)", "",
            "Llama 4 × 256, vocabulary 512 (recipes/llm/llama_stdlib_w4g32.yaml's model), int4 weights per group of 32, "
            "random init; bytes of `<name>.qparams.json` against its `.onnx`.", "", *table, "",
            f"Command: `python benchmarks/sidecar_size.py --baseline {args.baseline}`. Machine: {cpu_description()}. "
            f"Date: {datetime.now(UTC):%Y-%m-%d}.",
        ])


if __name__ == "__main__":
    main()
