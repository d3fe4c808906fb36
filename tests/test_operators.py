"""Operators between layers quantized where they are produced (recipe ``operators``), and the
fixed-grid gate of Hardswish and Hardsigmoid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
import qat.export.verify
from qat.core.gate import GateQuantizer
from qat.core.quantizer import Quantizer
from qat.errors import ConfigError
from qat.export import ort_kernels
from qat.export.diagnose import Replay, activation_codes, replay
from qat.modules.activation import QuantHardsigmoid, QuantHardswish
from qat.preparation.recipe import QuantRecipe
from qat.preparation.residuals import OUTPUT_QUANTIZER
from qat.training.control import deployed_inference

ALL = ["add", "mul", "concat", "pool", "activation"]


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, 4, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(4, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand (conv, BN, Hardswish), squeeze-excite, project, residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.se = SqueezeExcite(16)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        return x + self.project(self.se(self.expand(x)))


class Fire(nn.Module):
    """SqueezeNet's two branches, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], 1)


class EdgeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
        self.block = InvertedResidual()
        self.fire = Fire()
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        return self.head(self.pool(self.fire(self.block(self.stem(x)))).flatten(1))


def _prepared(operators=ALL, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = EdgeNet()
    model.train()
    with torch.no_grad():  # BatchNorm statistics of the data
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8))
    return qat.prepare(model.eval(), {"weight": {"bits": 4}, "operators": operators}, example_inputs=torch.randn(2, 3, 8, 8))


def _calibrated() -> nn.Module:
    model = _prepared()
    qat.calibrate(model, [torch.randn(8, 3, 8, 8) for _ in range(3)], progress=False)
    return model.eval()


def test_each_operator_kind_quantizes_its_operands_and_result():
    model = _prepared()
    outputs = model.qat_state.residuals
    modules = dict(model.named_modules())
    assert isinstance(modules["stem.2"], QuantHardswish) and isinstance(modules["block.se.gate"], QuantHardsigmoid)
    assert set(outputs) == {
        "stem.0", "stem.2",                    # a Hardswish's operand (conv, BN folded) and result, also the sum's operand
        "block.expand.0", "block.expand.2",    # the second Hardswish: its result is read by the pool and the product
        "block.se.pool", "block.se.expand",    # the pool's result; the Hardsigmoid's operand
        "block.se",                            # the product (the gate itself is on its fixed grid: no quantizer after it)
        "block.project.0", "block",            # the sum's other operand; the sum
        "fire.left", "fire.right", "fire",     # the concatenation's operands and result, which the pool reads
        "pool",                                # the pool's result
    }
    for name in outputs:
        assert isinstance(getattr(modules[name], OUTPUT_QUANTIZER), Quantizer), name
    assert modules["fire.left"].input_quantizer is None and modules["fire.right"].input_quantizer is None  # read the sum
    only_adds = _prepared(["add"])
    assert set(only_adds.qat_state.residuals) == {"stem.2", "block.project.0", "block"}
    assert not any(isinstance(m, QuantHardswish) for m in only_adds.modules())


def test_the_recipe_key_is_checked_and_saved():
    recipe = QuantRecipe.from_dict({"operators": ["mul", "pool"]})
    assert recipe.quantized_operators == {"mul", "pool"}
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe
    assert QuantRecipe.from_dict({"residuals": True}).quantized_operators == {"add"}
    with pytest.raises(ConfigError, match=r"operators\[1\].*`max` is not one of add, mul, concat, pool, activation"):
        QuantRecipe.from_dict({"operators": ["mul", "max"]})
    with pytest.raises(ConfigError, match=r"operators.*per-tensor activation spec"):
        QuantRecipe.from_dict({"operators": ["mul"], "activation": None})


def test_the_gate_is_the_hard_gate_on_a_fixed_grid_with_its_gradient():
    x = torch.linspace(-5, 5, 2001, requires_grad=True)
    gate = GateQuantizer()(x)
    exact = F.hardsigmoid(x.detach())
    assert (gate - exact).abs().max() <= 0.5 / 255 + 1e-6
    codes = gate.detach() * 255
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on steps of 1/255
    gate.sum().backward()
    inside = (x.detach() > -3) & (x.detach() < 3)
    assert torch.allclose(x.grad[inside], torch.full_like(x.grad[inside], 1 / 6))
    outside = (x.detach() < -3.01) | (x.detach() > 3.01)  # the clamp's edges, within half a step, keep the gradient
    assert (x.grad[outside] == 0).all()
    y = torch.randn(64)
    assert torch.equal(QuantHardswish()(y), y * GateQuantizer()(y))
    assert torch.equal(QuantHardsigmoid()(y), GateQuantizer()(y))


def test_ort_runs_the_whole_network_on_integer_kernels(tmp_path):
    model = _calibrated()
    x = torch.randn(4, 3, 8, 8)
    result = qat.export_onnx(model, x, tmp_path / "edge.onnx", verification_inputs=[torch.randn(4, 3, 8, 8)])
    assert result.ort.integer_kernel_share == 1.0, result.ort.kernels
    counts = ort_kernels.kernel_report(result.ort.path, {}, result.ort.session_config).counts
    for kernel in ("QLinearConv", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearAveragePool"):
        assert counts.get(kernel, 0) >= 1, (kernel, counts)
    for float_op in ("HardSigmoid", "HardSwish", "ReduceMean", "Div", "Concat", "Mul"):
        assert float_op not in counts, (float_op, counts)
    tensors = json.loads(result.ort.qparams_path.read_text())["tensors"]
    gates = {name: e for name, e in tensors.items() if e["quantizer"].endswith("gate_quantizer") and e["role"] == "activation"}
    assert len(gates) == 3 and all(e["dtype"] == "uint8" and e["qmin"] == 0 and e["qmax"] == 255 for e in gates.values())
    # written at 6/255, read at 1/255 in the ort artifact (the division by 6 folded in); the device artifact divides
    assert {round(e["scale"][0] * 255, 5) for e in gates.values()} == {6.0}
    assert {round(e["dequantize_scale"][0] * 255, 5) for e in gates.values()} == {1.0}
    shifts = [e for e in tensors.values() if e["role"] == "constant"]
    assert len(shifts) == 3 and all(e["scale"] == [3.0] and e["float_tensor"] is None for e in shifts)
    device = json.loads(result.device.qparams_path.read_text())["tensors"]
    assert all("dequantize_scale" not in device[name] for name in gates)
    assert not any(e["role"] == "constant" for e in device.values())
    for artifact in result.artifacts.values():
        assert qat.export.verify.verify_artifact(artifact.path).problems == []
    gate = next(iter(gates))
    tensors[gate]["dequantize_scale"] = [tensors[gate]["dequantize_scale"][0] * 2]  # a sidecar that misreads the gate
    result.ort.qparams_path.write_text(json.dumps({**json.loads(result.ort.qparams_path.read_text()), "tensors": tensors}))
    problems = qat.export.verify.verify_artifact(result.ort.path).problems
    assert any(gate in p and "other numbers" in p for p in problems), problems


def test_a_fresh_model_is_prepared_the_same_way_and_strip_restores_the_float_modules():
    model = _calibrated()
    state = model.qat_state.to_dict()
    torch.manual_seed(1)
    fresh = qat.prepare(EdgeNet().eval(), state["recipe"], bn_folds=state["bn_folds"], residuals=state["residuals"])
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with qat.evaluating(model), qat.evaluating(fresh):
        assert torch.equal(model(x), fresh(x))
    stripped = qat.strip(model)
    assert isinstance(stripped.stem[2], nn.Hardswish) and isinstance(stripped.block.se.gate, nn.Hardsigmoid)
    assert not any(isinstance(m, Quantizer | GateQuantizer) for m in stripped.modules())


class DenseBlock(nn.ModuleDict):
    """DenseNet's block: a ``ModuleDict`` that runs its layers in order and returns their concatenation."""

    def __init__(self) -> None:
        super().__init__({"a": nn.Conv2d(4, 4, 3, padding=1), "b": nn.Conv2d(8, 4, 3, padding=1)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


def test_a_container_is_never_given_an_output_quantizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DenseBlock(), nn.Conv2d(12, 2, 1))
    qat.prepare(model, {"operators": ALL}, example_inputs=torch.randn(1, 3, 6, 6))
    assert "1" not in model.qat_state.residuals
    assert not hasattr(model[1], OUTPUT_QUANTIZER)
    assert model(torch.randn(1, 3, 6, 6)).shape == (1, 2, 6, 6)


def test_codes_fed_back_include_the_gates_and_change_nothing():
    model = _calibrated()
    x = torch.randn(2, 3, 8, 8)
    with deployed_inference(model):
        reference = model(x)
        codes = activation_codes(model, lambda: model(x))
        outputs = []
        again = activation_codes(model, lambda: outputs.append(model(x)), forced=codes)
    assert {"stem.2.gate_quantized", "block.se.gate.gate_quantized"} <= set(codes)
    assert codes["stem.2.gate_quantized"].min() >= 0 and codes["stem.2.gate_quantized"].max() <= 255
    assert torch.equal(outputs[0], reference)
    assert all(np.array_equal(codes[name], again[name]) for name in codes)


def test_replay_tells_rounding_flips_from_a_wrong_graph():
    ort_codes = {"a_quantized": np.array([3, 4, 5]), "b_quantized": np.array([7, 7])}
    ort_outputs = [np.array([1.0, 2.0], np.float32)]
    flips = replay(ort_codes, ort_outputs, lambda given: ([np.array([1.0, 2.0 + 1e-7], np.float32)],
                                                          {"a_quantized": np.array([3, 4, 6]), "b_quantized": np.array([7, 7])}))
    assert flips == Replay(steps=1, differing=1, total=5, max_abs_diff=pytest.approx(1e-7, abs=1e-7))
    assert flips.explains(rtol=0.05, output_scale=2.0)
    assert "every difference is a rounding flip" in flips.describe(0.05, 2.0)
    wrong = replay(ort_codes, ort_outputs, lambda given: ([np.array([1.0, 2.0], np.float32)],
                                                          {"a_quantized": np.array([3, 4, 9]), "b_quantized": np.array([7, 7])}))
    assert wrong.steps == 4 and not wrong.explains(0.05, 2.0)
    assert "rounding flip" not in wrong.describe(0.05, 2.0)
