"""ONNXExport after training on a GPU: the callback exports (on the CPU) a model trained on CUDA,
for the tests' tiny CNN (bf16-mixed) and tiny Llama; both artifacts must verify.

Usage: python benchmarks/gpu_export.py OUT_DIR"""

import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lightning.pytorch as pl
import torch
from lightning_models import CNN_RECIPE, LLAMA_RECIPE, LitClassifier, LitLlama

from qat.export.verify import verify_artifact
from qat.lightning import ONNXExport, QuantizationAwareTraining

warnings.filterwarnings("ignore")
out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
print("torch", torch.__version__, torch.cuda.get_device_name())
for name, module, recipe in [("cnn", LitClassifier, CNN_RECIPE), ("llama", LitLlama, LLAMA_RECIPE)]:
    pl.seed_everything(0, verbose=False)
    export = ONNXExport(out / name / "model.onnx")
    pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=20, max_epochs=None, logger=False,
               enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
               callbacks=[QuantizationAwareTraining(recipe, schedule={"fake_quant_from": 1}, print_summary=False), export]
               ).fit(module())
    for artifact in export.result.artifacts.values():
        report = verify_artifact(artifact.path)
        p = artifact.parity
        print(f"{name:6} {artifact.kind:6} ok={report.ok} {report.problems} max diff {p.max_abs_diff:.3g} / {p.output_scale:.3g} "
              f"top1 {p.top1_agreement} ppl {p.perplexity} kernels {sorted(set(artifact.kernels.values()))}", flush=True)
