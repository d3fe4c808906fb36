"""Deployed speed: ONNX Runtime CPU latency of the float export against the *ort* artifact.

Vision: torchvision ResNet-18, MobileNetV3-small and MobileNetV3-large at 224×224, batch 1 and 32
(one graph with a free batch dimension per model), int4 per-channel weights (first conv 7-bit),
uint8 activations, and every operator between layers quantized (recipe ``operators: [add, mul,
concat, pool, activation]``: residual additions, squeeze-excite multiplications and pools,
Hardswish and Hardsigmoid on their fixed-grid gate). The same model prepared without
``operators`` (layer inputs quantized only) is timed beside it. For the vision models ORT's
profiler also gives the time its convolution kernels take in each file (float Conv against
QLinearConv, summed over the graph), which bounds what any quantization of the glue between them
can reach. ViT-tiny (timm, 224×224, batch 1 and 32): int4 per-channel weights and uint8 inputs on
every Linear, the format of the shipped ViT recipe (its additions feed LayerNorms, which have no
integer kernel, so no ``operators``). LLM: the decode step of a Llama (4 layers × 1024,
vocabulary 8192) at M = 1, one token in and its logits out, int4 weights per group of 32 with
dynamic int8 per-token activations, which ONNX Runtime runs as MatMulNBits. Models are random
init, calibrated on random data: latency does not depend on the values.

For each model: file sizes, median latency of both files (the same session options as the
export's verification), the speed-up, and which kernels ran in the ort artifact (from its
qparams sidecar's kernel report).

A peer for the vision models: ONNX Runtime's own post-training tool
(``onnxruntime.quantization.quantize_static``, QDQ format, int8 per-channel weights, uint8
activations on every operator it supports, calibrated on random images) applied to the same float
export. It quantizes the output of every Conv, Add and activation it supports: the speed this CPU
gives when ORT can fuse every layer it knows.

Run:  python benchmarks/ort_latency.py [--runs 20] [--models resnet18 mobilenet_v3_small llama-decode] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from results_md import cpu_description, write_block

import qat
from qat.export import ort_kernels
from qat.export.latency import median_latency_ms

OPERATORS = ["add", "mul", "concat", "pool", "activation"]
VISION_RECIPE = {"weight": {"bits": 4}, "rules": [{"names": "conv1|features\\.0\\.0", "weight": {"bits": 7}}], "operators": OPERATORS}
LLM_RECIPE = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 32},
              "activation": {"granularity": "per_token", "signed": True, "symmetric": True}}


def _image_model(build, recipe: dict):
    """An image model (224×224) built from seed 0, prepared with ``recipe`` and calibrated on random
    images, with its inputs at batch 1 and 32."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, 224, 224)
    qat.prepare(model, recipe, example_inputs=x)
    torch.manual_seed(1)
    with warnings.catch_warnings():  # untrained BatchNorm statistics: the values are off, the latency is not
        warnings.simplefilter("ignore", qat.CalibrationWarning)
        qat.calibrate(model, [torch.randn(4, 3, 224, 224) for _ in range(2)], progress=False)
    feeds = {1: [x.numpy()], 32: [torch.randn(32, 3, 224, 224).numpy()]}
    return model.eval(), (x,), {}, feeds, {"dynamic_batch": True, "rtol": 0.3}


def vision(name: str, operators: bool = True):
    import torchvision

    return _image_model(getattr(torchvision.models, name), {**VISION_RECIPE, "operators": OPERATORS if operators else []})


def vit():
    import timm

    return _image_model(lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10), {"weight": {"bits": 4}})


def llama_decode():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=2816, vocab_size=8192, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    qat.prepare(model, LLM_RECIPE)
    qat.calibrate(model, [{"input_ids": torch.randint(0, 8192, (1, 8))}], progress=False)  # weight ranges
    ids = torch.randint(0, 8192, (1, 1))
    return model.eval(), (), {"input_ids": ids, "use_cache": False}, {1: [ids.numpy()]}, {}


VISION = ("resnet18", "mobilenet_v3_small", "mobilenet_v3_large")
MODELS = {**{name: lambda name=name: vision(name) for name in VISION}, "vit_tiny": vit, "llama-decode": llama_decode}
IMAGES = (*VISION, "vit_tiny")


def float_export(model, args, kwargs, path: Path, dynamic_batch: bool) -> None:
    """``torch.onnx.export`` of the float model (``qat.strip``: the same architecture, no quantizers)."""
    with qat.evaluating(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stripped = qat.strip(model)
        shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        torch.onnx.export(stripped, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=shapes, verbose=False).save(str(path))


def ort_quantize_static(float_path: Path, folder: Path) -> Path:
    """ONNX Runtime's own static QDQ quantization of ``float_path`` (the peer column)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            generator = np.random.default_rng(0)
            self.batches = iter([{name: generator.standard_normal((1, 3, 224, 224), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    prepared, quantized = folder / f"{float_path.stem}.pre.onnx", folder / f"{float_path.stem}.ort_tool.onnx"
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    name = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    quantize_static(str(prepared), str(quantized), Images(name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return quantized


def conv_kernel_ms(path: Path, config: dict[str, str], inputs: list[np.ndarray], runs: int) -> float:
    """The time per run ORT's profiler gives the convolution kernels (Conv, FusedConv, QLinearConv…)
    of the model at ``path``, summed over the graph."""
    options = ort_kernels.session_options(config)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = dict(zip([i.name for i in session.get_inputs()], inputs, strict=True))
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    total_us = sum(e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                   and "Conv" in e.get("args", {}).get("op_name", ""))
    return total_us / runs / 1000


def measure(name: str, runs: int, folder: Path) -> list[str]:
    model, args, kwargs, feeds, options = MODELS[name]()
    example = args[0] if args else {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
    start = time.perf_counter()
    result = qat.export_onnx(model, example, folder / f"{name}.onnx", artifacts=["ort"], **options)
    export_s = time.perf_counter() - start
    float_path = folder / f"{name}.float.onnx"
    float_export(model, args, kwargs, float_path, options.get("dynamic_batch", False))
    sessions = {
        "float": ort.InferenceSession(str(float_path), ort_kernels.session_options({}), providers=["CPUExecutionProvider"]),
        "ort": ort.InferenceSession(str(result.ort.path), ort_kernels.session_options(result.ort.session_config),
                                    providers=["CPUExecutionProvider"]),
    }
    if name in VISION:
        inputs_only, *_ = vision(name, operators=False)
        plain = qat.export_onnx(inputs_only, example, folder / f"{name}.inputs.onnx", artifacts=["ort"], **options).ort
        sessions["inputs_only"] = ort.InferenceSession(str(plain.path), ort_kernels.session_options(plain.session_config),
                                                       providers=["CPUExecutionProvider"])
    if name in IMAGES:
        sessions["ort_tool"] = ort.InferenceSession(str(ort_quantize_static(float_path, folder)), providers=["CPUExecutionProvider"])
    used = ", ".join(f"{kernel} ×{n}" for kernel, n in Counter(result.ort.kernels.values()).most_common())
    rows = []
    for batch, inputs in feeds.items():
        ms = {kind: median_latency_ms(session, [np.asarray(t) for t in inputs], runs=runs) for kind, session in sessions.items()}
        peer, plain = (f"{ms[k]:.2f} ({ms['float'] / ms[k]:.2f}×)" if k in ms else "—" for k in ("ort_tool", "inputs_only"))
        convs = "—"
        if name in VISION:
            arrays = [np.asarray(t) for t in inputs]
            float_conv = conv_kernel_ms(float_path, {}, arrays, runs)
            ort_conv = conv_kernel_ms(result.ort.path, result.ort.session_config, arrays, runs)
            convs = f"{float_conv:.2f} / {ort_conv:.2f}"
        rows.append(f"| {name} | {batch} | {ms['float']:.2f} | {ms['ort']:.2f} | {ms['float'] / ms['ort']:.2f}× | {plain} | {peer} | "
                    f"{convs} | {float_path.stat().st_size / 1e6:.2f} | {result.ort.bytes / 1e6:.2f} | "
                    f"{result.ort.integer_kernel_share:.0%} | {used} | {export_s:.0f} s |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    lines = ["| model | batch | float ms | ort ms | speed-up | inputs only ms (speed-up) | ORT quantize_static ms (speed-up) "
             "| conv kernels ms, float / ort | float MB | ort MB | ort layers on integer kernels | ort kernels | export + verify |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            lines += measure(name, args.runs, Path(folder))
    footer = (f"Command: `python benchmarks/ort_latency.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
              f"{cpu_description()}, onnxruntime {ort.__version__} (CPUExecutionProvider, "
              f"{ort.SessionOptions().intra_op_num_threads or 'default'} threads), torch {torch.__version__}; median of "
              f"{args.runs} runs; {datetime.date.today():%Y-%m-%d}.")
    print(footer)
    if args.write:
        write_block("ort-latency", [*lines, "", footer])


if __name__ == "__main__":
    main()
