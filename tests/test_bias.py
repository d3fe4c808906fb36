"""The int32 bias contract: QAT adds the bias as integer runtimes do, and the export writes those codes."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_models import TinyResNet
from torch import nn

import qat
from qat import QuantSpec
from qat.core.bias import BIAS_QMAX, BIAS_QMIN, BiasQuantizer, bias_scale
from qat.core.quantizer import Quantizer
from qat.export.verify import verify_artifact
from qat.modules import QuantizedLayer

W4 = {"weight": {"bits": 4}}


def _quantizers(learnable: bool = False, per_channel: bool = True) -> tuple[Quantizer, Quantizer]:
    x_q = Quantizer(QuantSpec(bits=8, signed=False, symmetric=False, learnable=learnable), role="activation")
    granularity = "per_channel" if per_channel else "per_tensor"
    w_q = Quantizer(QuantSpec(bits=4, granularity=granularity, learnable=learnable), shape=(3, 5), role="weight")
    with torch.no_grad():
        x_q.scale.fill_(0.037)
        w_q.scale.copy_(torch.tensor([0.011, 0.023, 0.005]) if per_channel else torch.tensor(0.013))
    return x_q, w_q


@pytest.mark.parametrize("per_channel", [True, False])
def test_bias_lands_on_the_grid_of_input_scale_times_weight_scale(per_channel):
    x_q, w_q = _quantizers(per_channel=per_channel)
    bias = torch.tensor([0.0123, -0.4071, 1e-7])
    grid = (x_q.scale.float() * w_q.scale.float()).expand(3)
    expected = torch.round(bias / grid) * grid
    assert torch.equal(BiasQuantizer()(bias, x_q, w_q), expected)
    assert not torch.equal(expected, bias)  # the test means something: the grid moves these values


def test_the_bias_stays_float_while_either_quantizer_computes_in_float():
    x_q, w_q = _quantizers()
    bias = torch.tensor([0.0123, -0.4071, 0.2])
    x_q.enable_fake_quant(False)  # calibration: observe, compute in float
    assert torch.equal(BiasQuantizer()(bias, x_q, w_q), bias)
    x_q.enable_fake_quant(True)
    w_q.enable_fake_quant(False)
    assert torch.equal(BiasQuantizer()(bias, x_q, w_q), bias)


def test_bias_gradient_is_straight_through_and_reaches_learnable_scales():
    x_q, w_q = _quantizers(learnable=True)
    bias = torch.tensor([0.0123, -0.4071, 0.2], requires_grad=True)
    upstream = torch.tensor([1.0, -2.0, 0.5])
    (BiasQuantizer()(bias, x_q, w_q) * upstream).sum().backward()
    assert torch.equal(bias.grad, upstream)
    # y = round(b / g) · g with g = s_x · s_w: dy/dg = round(b / g) − b / g (no clamping in int32)
    grid = (x_q.scale * w_q.scale).detach()
    d_grid = upstream * (torch.round(bias.detach() / grid) - bias.detach() / grid)
    torch.testing.assert_close(x_q.scale.grad, (d_grid * w_q.scale.detach()).sum())
    torch.testing.assert_close(w_q.scale.grad, d_grid * x_q.scale.detach())


def test_the_code_range_is_exact_in_float32():
    assert float(np.float32(BIAS_QMAX)) == BIAS_QMAX and float(np.float32(BIAS_QMIN)) == BIAS_QMIN
    x_q, w_q = _quantizers()
    huge = torch.tensor([1e9, -1e9, 0.0])
    grid = bias_scale(x_q, w_q)
    assert torch.equal(BiasQuantizer()(huge, x_q, w_q)[:2], torch.stack([BIAS_QMAX * grid[0], BIAS_QMIN * grid[1]]))


def _convnet(bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def _trained_bn(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return model


def test_prepare_gives_int32_biases_where_a_runtime_adds_them_and_the_recipe_can_turn_them_off():
    x = torch.randn(2, 3, 8, 8)
    model = qat.prepare(_convnet(bias=False), W4, example_inputs=x)
    has = {name: layer.bias_quantizer is not None for name, layer in model.named_modules() if isinstance(layer, QuantizedLayer)}
    # the first conv has no bias of its own, but its folded BatchNorm gives it one; the 1x1 conv has neither
    assert has == {"0": True, "3": True, "5": False, "8": True}
    model = qat.prepare(_convnet(), {**W4, "bias": "float"}, example_inputs=x)
    assert all(layer.bias_quantizer is None for layer in model.modules() if isinstance(layer, QuantizedLayer))
    assert model.qat_state.recipe.to_dict()["bias"] == "float"
    assert "bias" not in qat.QuantRecipe().to_dict()  # the default is left out: older recipes stay equal


@pytest.mark.parametrize("recipe", [
    {"weight": {"bits": 4, "granularity": "per_group", "group_size": 4}},   # blocked weights: MatMulNBits takes a float bias
    {"activation": {"granularity": "per_token", "signed": True, "symmetric": True}},   # a scale per token
    {"activation": None},   # weight-only
])
def test_no_int32_bias_where_no_integer_accumulator_has_one_grid(recipe):
    model = qat.prepare(nn.Sequential(nn.Linear(8, 4)), recipe)
    assert model[0].bias_quantizer is None


def test_bias_key_errors_name_the_key():
    with pytest.raises(qat.ConfigError, match=r"bias.*int32, float.*`'int8'`"):
        qat.QuantRecipe.from_dict({"bias": "int8"})


def test_a_folded_convolution_in_eval_mode_adds_the_int32_bias_the_device_adds():
    x = torch.randn(4, 3, 8, 8) * 2 + 0.5
    model = qat.prepare(_trained_bn(_convnet()), W4, example_inputs=x)
    model(x)  # calibrate
    qat.set_observers(model, False)
    conv = model[0]
    conv.eval()
    weight, bias = conv.float_weight_bias()
    q_x = conv.input_quantizer(x)
    deployed = nn.functional.conv2d(q_x, conv.weight_quantizer.fake_quantize(weight), conv.quantize_bias(bias))
    assert not torch.allclose(conv.quantize_bias(bias), bias)
    torch.testing.assert_close(conv(x), deployed, atol=1e-5, rtol=1e-5)
    # in training with frozen statistics the training form computes the same numbers
    conv.train()
    conv.freeze_bn_stats()
    torch.testing.assert_close(conv(x), deployed, atol=1e-5, rtol=1e-5)


def test_a_residual_reader_takes_its_bias_grid_from_the_producer_of_its_input():
    x = torch.randn(2, 3, 8, 8)
    model = qat.prepare(_trained_bn(TinyResNet()), {**W4, "residuals": True}, example_inputs=x)
    model(x)
    fed = [m for m in model.modules() if isinstance(m, QuantizedLayer) and m.input_quantizer is None and m.input_from]
    assert fed, "the recipe moved some input quantizer to its producer"
    for layer in fed:
        layer.eval()
        _, bias = layer.float_weight_bias()
        grid = layer.input_from[0].scale * layer.weight_quantizer.scale
        torch.testing.assert_close(layer.quantize_bias(bias), torch.round(bias / grid) * grid)


def test_export_writes_the_int32_bias_and_its_metadata(tmp_path):
    x = torch.randn(4, 3, 8, 8) * 2 + 0.5
    model = qat.prepare(_trained_bn(_convnet()), W4, example_inputs=x)
    qat.calibrate(model, [x])
    result = qat.export_onnx(model, x, tmp_path / "net.onnx")
    for artifact in result.artifacts.values():
        graph = onnx.load(str(artifact.path)).graph
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        codes, grid = initializers["0.bias_quantized"], initializers["0.bias_scale"]
        assert codes.dtype == np.int32
        _, bias = model[0].float_weight_bias()
        expected_grid = (model[0].input_quantizer.scale * model[0].weight_quantizer.scale).detach().numpy()
        np.testing.assert_array_equal(grid, expected_grid)
        np.testing.assert_array_equal(codes, np.round(bias.detach().numpy() / grid).astype(np.int32))
        dequantizers = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "0.bias_quantized"]
        assert len(dequantizers) == 1 and list(dequantizers[0].input) == ["0.bias_quantized", "0.bias_scale"]
        qparams = json.loads(artifact.qparams_path.read_text())
        entry = qparams["tensors"]["0.bias_quantized"]
        assert (entry["role"], entry["dtype"], entry["bits"], entry["layer"]) == ("bias", "int32", 32, "0")
        assert qparams["layers"]["0"]["bias"] == "0.bias_quantized" and qparams["layers"]["5"]["bias"] is None
        assert verify_artifact(artifact.path).ok
    assert result.ort.kernels["0"] == "QLinearConv"
    assert result.max_abs_diff <= 1e-4 * result.output_scale
