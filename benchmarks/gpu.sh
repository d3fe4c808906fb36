#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call: bash benchmarks/gpu.sh
# (the GPU machine has torch, lightning, onnx, onnxruntime, timm and transformers preinstalled, no internet)
set -euo pipefail
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# no internet there, so no build backend for `pip install -e .`: run from the checkout
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# jsonschema is not preinstalled there: carry its wheels (cp312) in .gpu-wheels/ (run's `carry`), made with
#   pip download jsonschema --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 -d .gpu-wheels
python -c "import jsonschema" 2>/dev/null || python -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
python benchmarks/gpu_lightning.py --out "$OUT/gpu_lightning.json" 2>&1 | grep -v -E "Warning|warn|^  " 
# compiled QAT must follow eager QAT step for step (a torch 2.11 Dynamo bug once zeroed the gradients)
python benchmarks/gpu_compile_parity.py cuda "lightning qat eager" "lightning qat compiled" "plain qat eager" "plain qat compiled" 2>&1 | grep -v -E "Warning|warn|^  "
# ONNXExport after training on the GPU: both artifacts of the CNN and the Llama must verify
python benchmarks/gpu_export.py "$OUT/gpu_export" 2>&1 | grep -E "^(torch|cnn|llama)"
# issue 6: QAT step time and peak memory against float and the peers, bf16 autocast, eager then compiled
# (torchao's wheel is in .gpu-wheels too); each writes its block of benchmarks/RESULTS.md into $OUT
python -c "import torchao" 2>/dev/null || python -m pip install -q --no-index --no-deps .gpu-wheels/torchao-*.whl
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
RESULTS_MD="$OUT/RESULTS.md" python benchmarks/overhead.py --device cuda --write 2>&1 | grep -E "^\||Command"
RESULTS_MD="$OUT/RESULTS.md" python benchmarks/overhead.py --device cuda --compile --write 2>&1 | grep -E "^\||Command"
