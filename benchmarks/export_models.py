"""Export figures for real architectures (random init, calibrated on random data): time of
export + verification, file sizes of the float export and both artifacts, parity, and the ONNX
Runtime kernels of the ort artifact.

Usage: python benchmarks/export_models.py [model names]   (prints a markdown table)
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_architectures import LLM_RECIPE, _language, _vision
from test_export_models import VISION_EXPORT_RECIPE

import qat


def calibrated(name: str):
    torch.manual_seed(0)
    if name.startswith("torchvision"):
        model, x = _vision(name), torch.randn(1, 3, 224, 224)
        qat.prepare(model, VISION_EXPORT_RECIPE, example_inputs=x)
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(4, 3, 224, 224))
        return model.eval(), x, {"rtol": 0.3}
    model = _language(name)
    qat.prepare(model, LLM_RECIPE)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (4, 32)))
    return model.eval(), {"input_ids": torch.randint(0, 128, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}, {}


def float_bytes(model, x, folder: Path) -> int:
    path = folder / "float.onnx"
    with qat.evaluating(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stripped = qat.strip(model)
        args, kwargs = ((), {**x, "use_cache": False}) if isinstance(x, dict) else ((x,), {})
        torch.onnx.export(stripped, args, kwargs=kwargs or None, dynamo=True, verbose=False).save(str(path))
    return path.stat().st_size


def main() -> None:
    print("| model | export + verify (both artifacts) | float | device | ort | ort parity | ort kernels |")
    print("|---|---|---|---|---|---|---|")
    for name in sys.argv[1:] or ["torchvision.resnet18", "torchvision.mobilenet_v3_small", "transformers.LlamaForCausalLM"]:
        model, x, options = calibrated(name)
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            result = qat.export_onnx(model, x, Path(folder) / "m.onnx", **options)
            seconds = time.perf_counter() - start
            size = float_bytes(model, x, Path(folder))
        p = result.ort.parity
        figure = f"top-1 {p.top1_agreement:.0%}" if p.top1_agreement is not None else f"ppl Δ {p.perplexity['delta']:+.3f}"
        kernels = ", ".join(f"{k} ×{n}" for k, n in Counter(result.ort.kernels.values()).most_common())
        print(f"| {name} | {seconds:.1f} s | {size / 1e6:.2f} MB | {result.device.bytes / 1e6:.2f} MB | "
              f"{result.ort.bytes / 1e6:.2f} MB | {figure}, max diff {p.max_abs_diff:.3g} / {p.output_scale:.3g} | {kernels} |")


if __name__ == "__main__":
    main()
