"""The QAT callback on a GPU: bf16-mixed, torch.compile with Inductor, and the FSDP refusal.

Runs the tiny CNN and tiny Llama of the test suite for a few steps per variant, checks that the
loss is finite and falls, that every quantizer is calibrated with float32 scales on the GPU, and
prints a table (and writes it as JSON to --out). Usage::

    python benchmarks/gpu_lightning.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lightning.pytorch as pl
import torch
from lightning_models import MODELS, MemoryLogger

import qat
from qat.lightning import QuantizationAwareTraining

VARIANTS = {"bf16-mixed eager": ("bf16-mixed", False), "bf16-mixed compiled": ("bf16-mixed", True),
            "fp32 compiled": ("32-true", True)}


def run(kind: str, precision: str, compiled: bool, steps: int, accelerator: str) -> dict:
    module_cls, recipe = MODELS[kind]
    pl.seed_everything(0, verbose=False)
    model = module_cls()
    logger = MemoryLogger()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps, max_epochs=None, logger=logger,
                         log_every_n_steps=1, limit_val_batches=1, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False,
                         callbacks=[QuantizationAwareTraining(recipe, schedule={"fake_quant_from": 1}, print_summary=False)])
    start = time.perf_counter()
    trainer.fit(torch.compile(model) if compiled else model)
    seconds = time.perf_counter() - start
    losses = [v for _, v in logger.history["train_loss"]]
    scales = [q.scale for _, q in qat.quantizers(model) if not q.spec.dynamic]
    return {
        "first loss": losses[0], "last loss": losses[-1], "seconds": round(seconds, 1),
        "finite": all(math.isfinite(v) for v in losses),
        "scales fp32": all(s.dtype == torch.float32 for s in scales),  # (Lightning moves the model back to the CPU after fit)
        "calibrated": all(q.calibrated for _, q in qat.quantizers(model)),
        "val_loss": trainer.validate(model, verbose=False)[0]["val_loss"],
    }


def fsdp_refusal() -> str:
    try:
        pl.Trainer(accelerator="gpu", devices=1, strategy="fsdp", max_steps=1, logger=False,
                   callbacks=[QuantizationAwareTraining()]).fit(MODELS["cnn"][0]())
    except qat.QATError as error:
        return f"refused: {error}"
    return "NOT refused"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu_lightning.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accelerator", default="gpu", help="cpu: a quick local smoke run")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu"
    results: dict = {"device": device, "torch": torch.__version__, "lightning": pl.__version__}
    ok = True
    for kind in MODELS:
        for name in args.variants:
            precision, compiled = VARIANTS[name]
            try:
                row = run(kind, precision, compiled, args.steps, args.accelerator)
                row["ok"] = row["finite"] and row["scales fp32"] and row["calibrated"] and row["last loss"] < row["first loss"]
            except Exception:
                row = {"ok": False, "error": traceback.format_exc()[-2000:]}
            ok &= row["ok"]
            results[f"{kind} {name}"] = row
            print(f"{kind:6} {name:22} {json.dumps(row)}", flush=True)
    if args.accelerator == "gpu":  # Lightning runs FSDP on GPUs only
        results["fsdp"] = fsdp_refusal()
        ok &= results["fsdp"].startswith("refused")
        print("fsdp:", results["fsdp"])
    args.out.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
