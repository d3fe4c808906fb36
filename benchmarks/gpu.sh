#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call: bash benchmarks/gpu.sh [SECTION ...]
# Sections: lightning (callback, compile parity, ONNXExport after GPU training; about 6 min on an H200)
# and overhead (issue 6's GPU rows; at most 9 min); default both, which is more than one device call's
# 10 minutes: pass one section per call. Each overhead step has its own time limit and log under $OUT,
# so a step that fails or runs long costs its own figures only.
# (the GPU machine has torch, lightning, onnx, onnxruntime, timm and transformers preinstalled, no internet)
set -uo pipefail
OUT=${OUT:-.}
SECTIONS=${*:-lightning overhead}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# no internet there, so no build backend for `pip install -e .`: run from the checkout
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# jsonschema and torchao are not preinstalled there: carry their wheels (cp312) in .gpu-wheels/ (run's `carry`), made with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
#     -d .gpu-wheels jsonschema jsonschema-specifications referencing rpds-py torchao==0.17.0
python -c "import jsonschema, torchao" 2>/dev/null || python -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
quiet() { grep -v -E "Warning|warn|^  "; }
# step NAME SECONDS COMMAND...: run COMMAND under a time limit, its whole output in $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"; local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
}
if [[ " $SECTIONS " == *" lightning "* ]]; then
  python benchmarks/gpu_lightning.py --out "$OUT/gpu_lightning.json" 2>&1 | quiet
  # compiled QAT must follow eager QAT step for step (a torch 2.11 Dynamo bug once zeroed the gradients)
  python benchmarks/gpu_compile_parity.py cuda "lightning qat eager" "lightning qat compiled" "plain qat eager" "plain qat compiled" 2>&1 | quiet
  # ONNXExport after training on the GPU: both artifacts of the CNN and the Llama must verify
  python benchmarks/gpu_export.py "$OUT/gpu_export" 2>&1 | grep -E "^(torch|cnn|llama)"
fi
if [[ " $SECTIONS " == *" overhead "* ]]; then
  # issue 6: QAT step time and peak memory against float and the peers, bf16 autocast; each run writes
  # its block of benchmarks/RESULTS.md into $OUT/RESULTS.md. torch.ao's fake-quant fails under bf16
  # autocast (eager row). Compiling whole steps took over 3 min per model on an H100 (2026-11-27), so the
  # compiled runs compile each repeated block (regional compilation) and time the default variant only.
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  export RESULTS_MD="$OUT/RESULTS.md"
  step eager 120 python benchmarks/overhead.py --device cuda --write
  step compile-llama 200 python benchmarks/overhead.py --device cuda --compile regional --models llama-large \
    --variants lightning-qat torchao --write
  step compile-resnet50 200 python benchmarks/overhead.py --device cuda --compile regional --models resnet50 \
    --variants lightning-qat --write
  grep -h -E "^\||^Command|Error" "$OUT"/eager.log "$OUT"/compile-*.log
fi
