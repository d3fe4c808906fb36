"""A failed parity check names its cause: the first quantized tensor where ONNX Runtime and PyTorch part,
the ORT rewrite that parts them, or the model's own sensitivity to float rounding."""

import pytest
import torch
from torch import nn

import qat
from qat.core.fake_quant import export_face


class ScaledWhenExported(nn.Module):
    """A deliberate export bug: the traced graph multiplies by 1.5 where the PyTorch model does not."""

    def forward(self, x):
        return x * 1.5 if export_face() else x


def _calibrated(model: nn.Module, recipe: dict, inputs: torch.Tensor) -> nn.Module:
    model = qat.prepare(model, recipe)
    qat.calibrate(model, [inputs])
    return model


def test_a_wrong_graph_is_traced_to_the_first_tensor_it_changes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), ScaledWhenExported(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    model = _calibrated(model, {"weight": {"bits": 4}}, x)
    with pytest.raises(qat.QATError) as failure:
        qat.export_onnx(model, x, tmp_path / "m.onnx", artifacts=["device"])
    message = str(failure.value)
    assert "ONNX Runtime's codes first differ from PyTorch's at `3.input_quantized` (the input of `3`)" in message
    steps = int(message.split("by up to ")[1].split(" step")[0])
    assert steps > 1  # not a rounding flip
    assert "the graph itself does not compute what PyTorch does" in message
    assert "turns float rounding" not in message  # PyTorch alone barely moves
    assert not (tmp_path / "m.onnx").exists()


def test_an_ort_rewrite_that_changes_the_numbers_is_named(tmp_path):
    """With `bias: float` PyTorch adds a float bias; ONNX Runtime's WeightBiasQuantization rounds it to int32 at
    input scale × weight scale. A grid coarser than the next layer's step makes that visible."""
    torch.manual_seed(0)
    x = torch.rand(16, 4)
    float_bias = {"weight": {"bits": 4}, "bias": "float"}
    model = _calibrated(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), float_bias, x)
    first, second = model[0], model[2]
    with torch.no_grad():
        first.weight.zero_()  # the first layer's output is its bias
        first.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        first.input_quantizer.scale.fill_(0.5)
        first.weight_quantizer.scale.fill_(1.0)  # bias grid 0.5, far coarser than the next input's step
        second.input_quantizer.scale.fill_(0.4 / 255)
        second.input_quantizer.zero_point.zero_()
    with pytest.raises(qat.QATError) as failure:
        qat.export_onnx(model, x, tmp_path / "m.onnx", artifacts=["ort"])
    message = str(failure.value)
    assert "Without ORT's rewrite `WeightBiasQuantization` the artifact is within tolerance" in message
    assert "with the recipe's `bias: int32`" in message
    assert "at `2.input_quantized` (the input of `2`)" in message
    # the default recipe adds the int32 bias in PyTorch too: the same model exports
    model = _calibrated(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), {"weight": {"bits": 4}}, x)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        model[0].input_quantizer.scale.fill_(0.5)
        model[0].weight_quantizer.scale.fill_(1.0)
        model[2].input_quantizer.scale.fill_(0.4 / 255)
        model[2].input_quantizer.zero_point.zero_()
    result = qat.export_onnx(model, x, tmp_path / "m.onnx", artifacts=["ort"])
    assert result.ort.parity.max_abs_diff <= 1e-5 * result.ort.parity.output_scale
