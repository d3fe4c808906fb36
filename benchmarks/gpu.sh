#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call: bash benchmarks/gpu.sh [SECTION ...]
# Sections: lightning (callback, compile parity, ONNXExport after GPU training; about 6 min on an H200),
# kernels (qat.speed.fused_kernels' Triton kernels against the PyTorch ops, bit for bit, on the GPU; about 2 min)
# overhead (issue 6's GPU rows; at most 8 min) and compiled (issue 6's compiled rows alone, with room for the
# compilation: until DEADLINE, 585 s after the start by default; H200: the Llama 111 s, ResNet-50 210 s),
# profile (where the compiled float and QAT steps' time goes, by kernel: about 5 min on an H200), cudagraphs
# (the compiled rows again with the blocks run as CUDA graphs, which takes the host's launch work out of the
# step; H200: the Llama 111 s, ResNet-50 143 s before its unfolded variant was added). The default,
# `lightning kernels overhead`, is more than one device call's 10 minutes: pass `kernels overhead`,
# `compiled`, `profile`, `cudagraphs` or `lightning` per call, or pick models with MODELS, e.g.
# `MODELS=llama-large LLAMA_PEERS= bash benchmarks/gpu.sh compiled cudagraphs` (the Llama's compiled rows
# without torchao, in about 4 min). Each overhead step has its own time limit and log under $OUT, so a step
# that fails or runs long costs its own figures only.
# (the GPU machine has torch, lightning, onnx, onnxruntime, timm and transformers preinstalled, no internet)
set -uo pipefail
OUT=${OUT:-.}
SECTIONS=${*:-lightning kernels overhead}
# compiled and cudagraphs time the models in MODELS (default both), compiled the peers in LLAMA_PEERS beside the Llama
MODELS=" ${MODELS:-llama-large resnet50} "
LLAMA_PEERS=${LLAMA_PEERS-torchao}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# no internet there, so no build backend for `pip install -e .`: run from the checkout
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# jsonschema, torchao and the test tools are not preinstalled there: carry their wheels (cp312) in .gpu-wheels/
# (run's `carry`), made with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
#     -d .gpu-wheels jsonschema jsonschema-specifications referencing rpds-py torchao==0.17.0 \
#     hypothesis sortedcontainers pytest pluggy iniconfig
python -c "import jsonschema, torchao, hypothesis, pytest" 2>/dev/null || python -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
python -c "import torch, lightning, triton; print('torch', torch.__version__, 'lightning', lightning.__version__, 'triton', triton.__version__)"
quiet() { grep -v -E "Warning|warn|^  "; }
# step NAME SECONDS COMMAND...: run COMMAND under a time limit, its whole output in $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"; local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
}
# the benchmarks write their blocks into one copy of RESULTS.md under $OUT, shared by every section of the call
results_copy() {
  [[ -f "$OUT/RESULTS.md" ]] || cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  export RESULTS_MD="$OUT/RESULTS.md"
}
if [[ " $SECTIONS " == *" lightning "* ]]; then
  python benchmarks/gpu_lightning.py --out "$OUT/gpu_lightning.json" 2>&1 | quiet
  # compiled QAT must follow eager QAT step for step (a torch 2.11 Dynamo bug once zeroed the gradients)
  python benchmarks/gpu_compile_parity.py cuda "lightning qat eager" "lightning qat compiled" "plain qat eager" "plain qat compiled" 2>&1 | quiet
  # ONNXExport after training on the GPU: both artifacts of the CNN and the Llama must verify
  python benchmarks/gpu_export.py "$OUT/gpu_export" 2>&1 | grep -E "^(torch|cnn|llama)"
fi
if [[ " $SECTIONS " == *" kernels "* ]]; then
  # the fused kernels on CUDA tensors (tests/test_kernels.py; without a GPU it runs in Triton's interpreter)
  # first a smoke run of every kernel variant: if one cannot compile or run, the overhead runs go on
  # with QAT_TRITON=0 (the PyTorch ops) rather than fail
  if ! python -c "
import torch, qat.speed.fused_kernels as k
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.randn(8, 16, 32, device='cuda').to(dtype)
    for s in (torch.tensor(0.1, device='cuda'), torch.rand(1, 16, 1, device='cuda') + 0.01):
        assert k.can_fuse(x, s)
        for z in (None, torch.full_like(s, 3.0)):
            for value, mask in ((True, True), (True, False), (False, True)):
                k.fake_quantize_fused(x, s, z, -8, 7, value=value, mask=mask)
    k.finite_range_fused(x); k.finite_range_fused(x.view(-1))
torch.cuda.synchronize(); print('kernels run')"; then
    echo "== the kernels failed to run: the overhead runs go on with QAT_TRITON=0 (the PyTorch ops)"; export QAT_TRITON=0
  fi
  step kernels 80 python -m pytest tests/test_kernels.py -q -p no:cacheprovider
  tail -n 4 "$OUT/kernels.log"
fi
if [[ " $SECTIONS " == *" overhead "* ]]; then
  # issue 6: QAT step time and peak memory against float and the peers, bf16 autocast; each run writes
  # its block of benchmarks/RESULTS.md into $OUT/RESULTS.md. torch.ao's fake-quant fails under bf16
  # autocast (eager row). Compiling whole steps took over 3 min per model on an H100 (2026-11-27), so the
  # compiled runs compile each repeated block (regional compilation) and time the default variant only.
  results_copy
  step eager 150 python benchmarks/overhead.py --device cuda --write
  step compile-llama 180 python benchmarks/overhead.py --device cuda --compile regional --models llama-large \
    --variants lightning-qat torchao --write
  step compile-resnet50 100 python benchmarks/overhead.py --device cuda --compile regional --models resnet50 \
    --variants lightning-qat --write
  grep -h -E "^\||^Command|Error" "$OUT"/eager.log "$OUT"/compile-*.log
fi
if [[ " $SECTIONS " == *" compiled "* ]]; then
  # the compiled rows alone, which `overhead` gave too little time so far: ResNet-50's regional compile did
  # not finish in 100 s on an H100 (2026-11-27), the Llama's took 163 s
  results_copy
  [[ "$MODELS" == *" llama-large "* ]] && step compile-llama 220 python benchmarks/overhead.py --device cuda --compile regional \
    --models llama-large --variants lightning-qat $LLAMA_PEERS --write
  # ResNet-50 gets whatever is left of a 10-minute call (DEADLINE seconds after the script began)
  [[ "$MODELS" == *" resnet50 "* ]] && step compile-resnet50 $(( ${DEADLINE:-585} - SECONDS )) python benchmarks/overhead.py \
    --device cuda --compile regional --models resnet50 --variants lightning-qat --write
  grep -h -E "^\||^Command|Error|ready after" "$OUT"/compile-*.log
fi
if [[ " $SECTIONS " == *" profile "* ]]; then
  # the kernels of a compiled float and QAT step, by kind, and the time the GPU waits for the host (H200,
  # 2026-11-27: ResNet-50 ready after 60 s and 126 s, the Llama after 16 s and 48 s)
  step profile 400 python benchmarks/step_profile.py --device cuda --compile regional --models resnet50 llama-large --top 14
  grep -v -E "Warning|warn|USDT" "$OUT/profile.log"
fi
if [[ " $SECTIONS " == *" cudagraphs "* ]]; then
  # issue 6's compiled rows with torch.compile's reduce-overhead mode: is the host what keeps the compiled QAT
  # step from 1.10x? (H200 2026-11-27: ResNet-50 1.59x compiled, 1.35x as CUDA graphs; the Llama 1.12x both)
  results_copy
  [[ "$MODELS" == *" llama-large "* ]] && step cudagraphs-llama 240 python benchmarks/overhead.py --device cuda --compile regional \
    --compile-mode reduce-overhead --models llama-large --variants lightning-qat --write
  # with the fold left out beside it: how much of ResNet-50's kernel time is the BatchNorm fold (CPU: 10 of 35 ms)
  [[ "$MODELS" == *" resnet50 "* ]] && step cudagraphs-resnet50 $(( ${DEADLINE:-585} - SECONDS )) python benchmarks/overhead.py \
    --device cuda --compile regional --compile-mode reduce-overhead --models resnet50 \
    --variants lightning-qat "lightning-qat, BatchNorm not folded" --write
  grep -h -E "^\||^Command|Error|ready after" "$OUT"/cudagraphs-*.log
fi
