"""The export face lowers to ONNX QuantizeLinear/DequantizeLinear that ONNX Runtime runs with the
same numbers as PyTorch (the full exporter is issue 4; this pins the lowering it builds on)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

import qat
from qat.export.qdq import CUSTOM_TRANSLATION_TABLE, OPSET, onnx_container

RECIPES = {
    "w4_per_channel_a8": {"weight": {"bits": 4}},
    "w3_a3_narrow_ranges": {"weight": {"bits": 3}, "activation": {"bits": 3}},
    "w4_group_a16": {"weight": {"bits": 4, "granularity": "per_group", "group_size": 16}, "activation": {"bits": 16, "signed": True}},
    "w8_narrow_per_token_a4_affine": {"weight": {"bits": 8, "narrow_range": True},
                                      "activation": {"granularity": "per_token", "bits": 4, "symmetric": False}},
}


def _export(model, x, path):
    with qat.exporting():
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, opset_version=OPSET,
                                    custom_translation_table=CUSTOM_TRANSLATION_TABLE)
    program.save(str(path))
    return program.model_proto


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_exported_qdq_runs_in_onnxruntime_with_torch_numbers(recipe, tmp_path):
    model = qat.prepare(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), RECIPES[recipe])
    x = torch.randn(3, 5, 64)
    model(x)
    model.eval()
    qat.set_observers(model, False)
    proto = _export(model, x, tmp_path / "m.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 4
    assert not any(n.domain.startswith("qat") for n in proto.graph.node)
    expected = model(x).detach().numpy()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got_ort = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    got_ref = ReferenceEvaluator(str(tmp_path / "m.onnx")).run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    # Q/DQ are exact; the matmul accumulation order differs between runtimes
    np.testing.assert_allclose(got_ort, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ref, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_single_fake_quant_exports_bit_exact(tmp_path):
    class FQ(nn.Module):
        def forward(self, x):
            return qat.fake_quantize(x, torch.tensor([0.3, 0.05, 1.0]), torch.tensor([0.0, 2.0, -1.0]), -4, 3, axis=1)

    x = torch.randn(4, 3, 5) * 2
    _export(FQ().eval(), x, tmp_path / "fq.onnx")
    session = ort.InferenceSession(str(tmp_path / "fq.onnx"))
    np.testing.assert_array_equal(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], FQ()(x).numpy())


def test_container_types():
    from onnx import TensorProto

    assert onnx_container(-8, 7)[0] == TensorProto.INT4
    assert onnx_container(-4, 3)[0] == TensorProto.INT4
    assert onnx_container(0, 255)[0] == TensorProto.UINT8
    assert onnx_container(-127, 127)[0] == TensorProto.INT8
    assert onnx_container(0, 65535)[0] == TensorProto.UINT16
    assert onnx_container(-70000, 70000)[0] == TensorProto.INT32  # int32 biases
    with pytest.raises(qat.QATError):
        onnx_container(0, 2**32)
