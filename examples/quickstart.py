"""lightning-qat quick start: float → post-training quantization → QAT → ONNX, in about a minute.

Trains a small CNN on scikit-learn's digits (1,797 real 8×8 images that ship with scikit-learn,
so it runs offline), then for each weight bit width:

1. PTQ: ``qat.prepare`` with the recipe, ``qat.calibrate`` on training batches, evaluate;
2. QAT: fine-tune the prepared model with fake quantization on (activation ranges and BatchNorm
   statistics frozen after the first epoch), evaluate;
3. export the QAT model with ``qat.export_onnx``: a *device* file with int4 weights and an *ort*
   file laid out for ONNX Runtime's integer kernels, each verified in ONNX Runtime and described
   by a ``.qparams.json``; then check on the whole test set that ONNX Runtime predicts the same
   classes as PyTorch in both.

Run: ``python examples/quickstart.py`` (``--epochs`` / ``--qat-epochs`` / ``--bits`` to change it).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from rich.table import Table
from sklearn.datasets import load_digits
from torch import nn

import qat
from qat.export.exporter import ExportResult, FloatFallbackWarning, load_session

console = Console()


def digits(seed: int = 0):
    """Deterministic 80/20 split of scikit-learn's digits, as (N, 1, 8, 8) float tensors in [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def batches(x, y, size=64, shuffle=False, seed=0):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    for i in range(0, len(y), size):
        idx = order[i : i + size]
        yield x[idx], y[idx]


def train(model, data, epochs, lr, label):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in track(range(epochs), description=label, console=console, transient=True, disable=not console.is_terminal):
        for xb, yb in batches(*data, shuffle=True, seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in batches(*data))
    return 100.0 * correct / len(data[1])


def export_and_check(model, data, path: Path) -> tuple[ExportResult, dict[str, float]]:
    """Verified ONNX artifacts, and per artifact the share of test images where ONNX Runtime and
    PyTorch pick the same class."""
    x, _ = data
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)  # the classifier head: listed in the kernel line below
        result = qat.export_onnx(model, x[:8], path, dynamic_batch=True)
    with torch.no_grad(), qat.evaluating(model):
        torch_pred = model.eval()(x).argmax(1).numpy()
    agreement = {}
    for kind, artifact in result.artifacts.items():
        session = load_session(artifact.path)
        onnx_pred = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1)
        agreement[kind] = 100.0 * float(np.mean(onnx_pred == torch_pred))
    return result, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=6, help="QAT fine-tuning epochs")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2], help="weight bit widths to try")
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    args = parser.parse_args()
    torch.manual_seed(0)
    train_data, test_data = digits()
    example = train_data[0][:8]

    float_model = make_model()
    train(float_model, train_data, args.epochs, 1e-2, "float training")
    float_acc = accuracy(float_model, test_data)

    table = Table(title="sklearn digits, test accuracy (%)")
    table.caption = "ONNX Runtime = PyTorch: test images with the same class, device / ort artifact"
    for column in ("weights / inputs", "float", "PTQ", "QAT", "ONNX Runtime = PyTorch", "weight SQNR dB", "device KiB"):
        table.add_column(column, justify="right")
    results = []
    for bits in args.bits:
        # first conv at 7 bits, not 8: 8-bit weights with uint8 inputs run on ONNX Runtime's u8·s8
        # kernels, which saturate on x86 CPUs without VNNI (docs/design/core.md, "Export")
        recipe = {"weight": {"bits": bits}, "rules": [{"names": "0", "weight": {"bits": 7}}]}
        model = qat.prepare(copy.deepcopy(float_model), recipe, example_inputs=example)
        qat.calibrate(model, batches(*train_data, shuffle=True), num_batches=8)  # PTQ: observe ranges, then freeze them
        ptq_acc = accuracy(model, test_data)

        # QAT: one epoch with every range still observed, then activation ranges and BatchNorm
        # statistics frozen while the weights (and their ranges) keep training
        qat.set_observers(model, True)
        train(model, train_data, 1, 1e-3, f"QAT W{bits}, ranges settling")
        qat.set_observers(model, False, role="activation")
        qat.freeze_bn_stats(model)
        train(model, train_data, args.qat_epochs - 1, 1e-3, f"QAT W{bits}")
        qat.set_observers(model, False)
        qat_acc = accuracy(model, test_data)
        path = args.out / f"digits_w{bits}a8.onnx"
        result, agreement = export_and_check(model, test_data, path)
        results.append(result)
        sqnr = np.mean([r.weight_sqnr_db for r in qat.summary(model).layers])
        table.add_row(f"W{bits}A8", f"{float_acc:.1f}", f"{ptq_acc:.1f}", f"{qat_acc:.1f}",
                      f"{agreement['device']:.1f}/{agreement['ort']:.1f}", f"{sqnr:.1f}", f"{result.device.bytes / 1024:.1f}")
        if bits == args.bits[-1]:
            console.print(qat.summary(model))
    console.print(table)
    for result in results:
        for artifact in result.artifacts.values():
            kernels = ", ".join(f"{kernel} ×{n}" for kernel, n in Counter(artifact.kernels.values()).most_common())
            console.print(f"ONNX {artifact.kind}: {artifact.path} + {artifact.qparams_path.name} (ONNX Runtime kernels: {kernels})",
                          soft_wrap=True)


if __name__ == "__main__":
    main()
