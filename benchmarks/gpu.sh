#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call: bash benchmarks/gpu.sh
# (the GPU machine has torch, lightning, onnx, onnxruntime, timm and transformers preinstalled, no internet)
set -euo pipefail
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# no internet there, so no build backend for `pip install -e .`: run from the checkout
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
python benchmarks/gpu_lightning.py --out "$OUT/gpu_lightning.json" 2>&1 | grep -v -E "Warning|warn|^  " 
# compiled QAT must follow eager QAT step for step (a torch 2.11 Dynamo bug once zeroed the gradients)
python benchmarks/gpu_compile_parity.py cuda "lightning qat eager" "lightning qat compiled" "plain qat eager" "plain qat compiled" 2>&1 | grep -v -E "Warning|warn|^  "
