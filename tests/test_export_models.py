"""Real architectures through qat.export_onnx: both artifacts verify in ONNX Runtime, and the ort
artifact runs the integer kernels it was laid out for (QLinearConv for ResNet-18, MatMulNBits for
a Llama)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_architectures import FIRST_LAYERS, LLM_RECIPE, _language, _vision

import qat
from qat.export.sidecar import read_qparams, read_resolved, sidecar_path
from qat.export.verify import verify_artifact
from qat.modules import QuantizedLayer

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::qat.export.exporter.FloatFallbackWarning")]

# 7-bit first layer: 8-bit weights on uint8 inputs saturate ORT's u8·s8 kernels on x86 without VNNI
VISION_EXPORT_RECIPE = {"weight": {"bits": 4}, "rules": [{"names": FIRST_LAYERS, "weight": {"bits": 7}}]}


def calibrated_vision(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _vision(name)
    x = torch.randn(2, 3, 32, 32)
    qat.prepare(model, VISION_EXPORT_RECIPE, example_inputs=x)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval(), x


def quantized_layers(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, QuantizedLayer) and m.weight_quantizer is not None}


def check_artifacts(result, model) -> None:
    for artifact in result.artifacts.values():
        qparams = read_qparams(sidecar_path(artifact.path))  # validates against the schema
        assert set(qparams["layers"]) == quantized_layers(model), artifact.kind
        assert qparams["model"]["artifact"] == artifact.kind
        report = verify_artifact(artifact.path)
        assert report.ok, report.problems


@pytest.mark.parametrize("name", ["torchvision.resnet18", "torchvision.mobilenet_v3_small"])
def test_vision_model_exports_and_verifies(name, tmp_path):
    model, x = calibrated_vision(name)
    # at the default rtol: with int32 biases PyTorch adds the bias ONNX Runtime adds (with float biases, which
    # ORT quantizes on its own, this test needed rtol 0.3, and the export blamed ORT's fused kernels)
    result = qat.export_onnx(model, x, tmp_path / "net.onnx", verification_inputs=[torch.randn(2, 3, 32, 32)])
    check_artifacts(result, model)
    assert result.ort.parity.samples == 2
    device = {t.name: t.data_type for t in onnx.load(str(result.device.path)).graph.initializer}
    assert device["fc.weight_quantized" if "resnet" in name else "classifier.3.weight_quantized"] == onnx.TensorProto.INT4
    assert result.ort.bytes > result.device.bytes  # 4-bit values held in int8 for ORT's kernels
    if name == "torchvision.resnet18":
        kernels = result.ort.kernels
        # each block's first conv feeds ReLU → the next conv's quantized input: fused
        assert kernels["layer1.0.conv1"] == kernels["layer4.1.conv1"] == "QLinearConv"
        # the second conv feeds the residual Add, which has no quantized output: float (reported)
        assert kernels["layer1.0.conv2"] == "float FusedConv"  # Conv + Add + ReLU, in float
        assert {k.split()[0] for k in result.device.kernels.values()} == {"float"}  # true int4: no ORT kernel


def test_llama_ort_artifact_runs_matmulnbits(tmp_path):
    torch.manual_seed(0)
    model = _language("transformers.LlamaForCausalLM")
    ids = torch.randint(0, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the attention mask is a real input of the graph
    qat.prepare(model, LLM_RECIPE)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (4, 16)))
    result = qat.export_onnx(model.eval(), {"input_ids": ids, "attention_mask": mask}, tmp_path / "llama.onnx",
                             output_names=["logits"])
    check_artifacts(result, model)
    qparams = read_resolved(result.ort.path)
    assert [i["name"] for i in qparams["inputs"]] == ["input_ids", "attention_mask"]
    assert qparams["inputs"][0]["shape"] == [2, 16] and qparams["outputs"][0]["name"] == "logits"
    linears = {layer for layer, entry in qparams["layers"].items() if entry["type"] == "Linear"}
    assert len(linears) == 15 and {result.ort.kernels[layer] for layer in linears} == {"MatMulNBits"}
    assert qparams["verification"]["kernels"]["MatMulNBits"] == 15
    assert qparams["model"]["session_config"] == {"session.qdq_matmulnbits_accuracy_level": "4"}
    # device: the fake-quant math up to float rounding (0.04 % here); ort: MatMulNBits' own int8 activation blocks, a hair away
    device, ort_ppl = result.device.parity.perplexity, result.ort.parity.perplexity
    assert abs(device["delta"]) < 1e-3 * device["torch"]
    assert abs(ort_ppl["delta"]) < 0.01 * ort_ppl["torch"]
    # blocked int4 weight, [K, N] for MatMulNBits in the ort artifact, [N, K] as trained in the device one
    entry = qparams["tensors"]["model.layers.0.mlp.down_proj.weight_quantized"]
    assert (entry["dtype"], entry["block_size"], entry["axis"], entry["shape"]) == ("int4", 16, 0, [64, 32])
    device_entry = read_resolved(result.device.path)["tensors"]["model.layers.0.mlp.down_proj.weight_quantized"]
    assert (device_entry["axis"], device_entry["shape"]) == (1, [32, 64])
    np.testing.assert_array_equal(np.reshape(entry["scale"], (4, 32)), np.reshape(device_entry["scale"], (32, 4)).T)
    # the embedding: rows dequantized as they are gathered in the ort artifact, the whole table in the device one
    assert result.ort.kernels["model.embed_tokens"] == "GatherBlockQuantized"
    assert result.device.kernels["model.embed_tokens"] == "float Gather"
    produced = {o for n in onnx.load(str(result.ort.path)).graph.node for o in n.output}
    assert qparams["tensors"]["model.embed_tokens.weight_quantized"]["dequantized"] in produced
    _assert_gathered_rows_equal_the_dequantized_table(result.ort.path, result.device.path, "model.embed_tokens.weight_quantized", 128)


def _assert_gathered_rows_equal_the_dequantized_table(ort_path, device_path, table: str, vocabulary: int) -> None:
    """The ort artifact's GatherBlockQuantized, run alone on every row, against the device
    artifact's DequantizeLinear of the whole table followed by Gather: equal bit for bit."""
    import onnxruntime as ort

    def lone_node(path, op_type: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
        graph = onnx.load(str(path)).graph
        node = next(n for n in graph.node if n.op_type == op_type and n.input[0] == table)
        return node, [t for t in graph.initializer if t.name in node.input]

    fused, fused_tables = lone_node(ort_path, "GatherBlockQuantized")
    dequantize, device_tables = lone_node(device_path, "DequantizeLinear")
    fused.input[1], dequantize.output[0] = "ids", "table"
    del fused.output[:]
    fused.output.append("rows")
    gather = onnx.helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)
    ids = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [vocabulary])
    out = onnx.helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, None)
    opsets = [onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)]
    rows = []
    for nodes, tables in (([fused], fused_tables), ([dequantize, gather], device_tables)):
        model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [ids], [out], tables), opset_imports=opsets)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        rows.append(session.run(None, {"ids": np.arange(vocabulary)})[0])
    np.testing.assert_array_equal(rows[0], rows[1])



def _export_calibrated(model, recipe, path):
    """Prepare a small language model, calibrate it on two random batches and export it."""
    qat.prepare(model, recipe)
    ids, mask = torch.randint(0, 128, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=torch.randint(0, 128, (4, 16)))
    return qat.export_onnx(model.eval(), {"input_ids": ids, "attention_mask": mask}, path)


def test_bert_exports_and_verifies(tmp_path):
    torch.manual_seed(0)
    model = _language("transformers.BertModel")
    # signed int8 activations: ORT 1.32 on x86 rejects its own rewrite of them in front of a 3-D
    # Gemm unless the session turns MatMulAddFusion off, which both sidecars record
    recipe = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 16}, "activation": {"signed": True, "symmetric": True}}
    result = _export_calibrated(model, recipe, tmp_path / "bert.onnx")
    check_artifacts(result, model)
    assert len(onnx.load(str(result.device.path)).graph.output) == 2  # last_hidden_state, pooler_output
    for artifact in result.artifacts.values():
        assert artifact.session_config["optimization.disable_specified_optimizers"] == "MatMulAddFusion"
        assert read_qparams(sidecar_path(artifact.path))["model"]["session_config"] == artifact.session_config
        assert artifact.parity.max_abs_diff < 1e-3 * artifact.parity.output_scale


def test_bert_linears_run_on_integer_kernels_in_the_ort_artifact(tmp_path):
    """uint8 inputs, int4 per-channel weights: in the ort artifact each 3-D Linear's ``DQ → MatMul``
    becomes MatMulIntegerToFloat, once the session keeps ORT's MatMulAddFusion from turning it into
    a float Gemm first (recorded in the ort sidecar; the device artifact does not need it)."""
    torch.manual_seed(0)
    model = _language("transformers.BertModel")
    result = _export_calibrated(model, {"weight": {"bits": 4}}, tmp_path / "bert.onnx")
    check_artifacts(result, model)
    assert result.ort.session_config == {"optimization.disable_specified_optimizers": "MatMulAddFusion"}
    assert result.device.session_config == {}
    sequence_linears = [layer for layer in result.ort.kernels if ".encoder." in f".{layer}"]
    assert sequence_linears and {result.ort.kernels[layer] for layer in sequence_linears} == {"MatMulIntegerToFloat"}
    # the device artifact: int4 weights, no integer kernel; MatMulAddFusion made each a Gemm (named past the Transpose)
    assert {result.device.kernels[layer] for layer in sequence_linears} == {"float Gemm"}
