"""Quantizer: switches, learnable mode, and exact state_dict round trips."""

from __future__ import annotations

import copy

import pytest
import torch

import qat
from qat import ConfigError, QuantSpec
from qat.core.quantizer import Quantizer

SPECS = {
    "static_tensor": (QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average_minmax"), None, "activation"),
    "channel_learnable_affine": (QuantSpec(bits=4, symmetric=False, granularity="per_channel", learnable=True), (6, 5), "weight"),
    "group_mse": (QuantSpec(bits=4, granularity="per_group", group_size=2, observer="mse"), (6, 5), "weight"),
    "percentile": (QuantSpec(bits=8, signed=False, symmetric=False, observer="percentile"), None, "activation"),
    "per_token": (QuantSpec(bits=8, granularity="per_token"), None, "activation"),
}


def _trained_quantizer(name):
    spec, shape, role = SPECS[name]
    q = Quantizer(spec, shape, role, default_axis=0 if spec.granularity == "per_channel" else 1)
    for step in range(3):
        q(torch.randn(shape or (4, 5)) * (step + 1))
    if spec.learnable:
        with torch.no_grad():
            q.scale.mul_(1.1)
            q.zero_point.add_(0.3)
    q.enable_observer(False)
    q.enable_fake_quant(name != "percentile")
    return q


@pytest.mark.parametrize("name", list(SPECS))
def test_state_dict_round_trip_restores_everything(name):
    q = _trained_quantizer(name)
    spec, shape, role = SPECS[name]
    fresh = Quantizer(spec, shape, role, default_axis=0 if spec.granularity == "per_channel" else 1)
    fresh.load_state_dict(q.state_dict())
    for key, value in q.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.observer_enabled == q.observer_enabled and fresh.fake_quant_enabled == q.fake_quant_enabled
    x = torch.randn(shape or (4, 5))
    assert torch.equal(fresh(x), q(x))


def test_state_dict_survives_torch_save_with_weights_only(tmp_path):
    q = _trained_quantizer("channel_learnable_affine")
    torch.save(q.state_dict(), tmp_path / "q.pt")
    fresh = Quantizer(*SPECS["channel_learnable_affine"])
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert torch.equal(fresh.scale, q.scale) and fresh.observer_enabled is False


def test_switches():
    q = Quantizer(QuantSpec(bits=4), role="activation")
    x = torch.randn(100)
    q.enable_fake_quant(False)
    assert torch.equal(q(x), x)  # calibration: observes, passes through
    scale = q.scale.clone()
    assert scale.item() == pytest.approx(x.abs().max().item() / 7.5)
    q.enable_fake_quant(True).enable_observer(False)
    q(x * 10)  # frozen range: the scale does not move
    assert torch.equal(q.scale, scale)
    assert not torch.equal(q(x), x)


def test_learnable_mode_trains_scale_and_affine_zero_point():
    sym = Quantizer(QuantSpec(bits=4, learnable=True), role="activation")
    aff = Quantizer(QuantSpec(bits=4, learnable=True, symmetric=False), role="activation")
    assert isinstance(sym.scale, torch.nn.Parameter) and not isinstance(sym.zero_point, torch.nn.Parameter)
    assert isinstance(aff.scale, torch.nn.Parameter) and isinstance(aff.zero_point, torch.nn.Parameter)
    x = torch.randn(64)
    for q in (sym, aff):
        q(x)  # calibrate
        q.enable_observer(False)
        (q(x) - x * 0.5).pow(2).sum().backward()
        assert q.scale.grad is not None and q.scale.grad.abs() > 0
    assert aff.zero_point.grad is not None


def test_grad_factor_is_lsq_gradient_scale():
    q = Quantizer(QuantSpec(bits=4, granularity="per_channel", learnable=True), (8, 16), "weight")
    assert q.grad_factor(torch.empty(8, 16)) == pytest.approx(1 / (16 * 7) ** 0.5)


def test_per_channel_needs_a_shape_and_role_rules_apply():
    with pytest.raises(qat.QATError, match="needs the shape"):
        Quantizer(QuantSpec(granularity="per_channel"), role="weight")
    with pytest.raises(ValueError, match="`bits`"):
        Quantizer(QuantSpec(bits=16), (4, 4), role="weight")
    with pytest.raises(ValueError, match="`granularity`"):
        Quantizer(QuantSpec(granularity="per_token"), (4, 4), role="weight")


def test_calibrated_reports_whether_ranges_were_observed():
    q = Quantizer(QuantSpec(granularity="per_channel"), (3, 4), role="weight")
    assert not q.calibrated
    q(torch.randn(3, 4))
    assert q.calibrated


REUSE_RECIPES = {
    "per_channel": {"weight": {"bits": 4}, "activation": {"bits": 8, "signed": False, "symmetric": False}},
    "per_group_mse": {"weight": {"bits": 4, "granularity": "per_group", "group_size": 4, "observer": "mse"},
                      "activation": {"granularity": "per_token", "signed": True, "symmetric": True}},
}


@pytest.mark.parametrize("recipe", list(REUSE_RECIPES))
def test_weight_reuse_gives_the_same_values_and_gradients_once_per_weight_change(recipe, monkeypatch):
    """Gradient accumulation: three micro-batches per optimizer step. With ``set_weight_reuse``
    each weight is fake-quantized once per optimizer step, and the outputs, gradients, weights and
    scales equal those of the model that fake-quantizes on every forward pass, bit for bit."""
    import qat.core.quantizer

    torch.manual_seed(0)
    float_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    models = [qat.prepare(copy.deepcopy(float_model), REUSE_RECIPES[recipe]) for _ in range(2)]
    qat.set_weight_reuse(models[1])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    made = []
    kept = qat.speed.wing.fake_quantize_kept
    monkeypatch.setattr(qat.speed.wing, "fake_quantize_kept", lambda *a, **k: made.append(1) or kept(*a, **k))
    for _ in range(2):
        for micro_batch in torch.randn(3, 5, 8):
            outputs = [m(micro_batch) for m in models]
            assert torch.equal(outputs[0], outputs[1])
            for out in outputs:
                out.pow(2).mean().backward()
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert len(made) == 2 * 2  # two weights, two optimizer steps: not once per micro-batch
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    qat.set_weight_reuse(models[1], False)
    assert all(not qat.speed.wing.is_kept(q) for _, q in qat.quantizers(models[1]))


def test_weight_reuse_leaves_observers_that_move_on_every_call_alone():
    """A moving-average weight observer moves its range even for the same weight: nothing is kept."""
    model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(8, 4)), {"weight": {"bits": 4, "observer": "moving_average_minmax"}})
    qat.set_weight_reuse(model)
    x = torch.randn(2, 8)
    model(x).sum().backward()
    model(x).sum().backward()
    assert not qat.speed.wing.is_kept(model[0].weight_quantizer)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_on_grid_puts_each_blocks_largest_weight_on_the_grid(sign):
    """ONNX Runtime's int4 rule: ``s = amax / 8``, the zero point 0 (negative extreme: code -8) or
    -1 (positive extreme: code 7, one level above the symmetric grid's top), so the block's
    largest-magnitude weight survives fake quantization exactly, whatever its sign."""
    torch.manual_seed(0)
    w = torch.randn(16, 64).clamp(-3.5, 3.5)
    w[:, ::32] = sign * 4.0  # each block's extreme, of one sign
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32, axis=1, extreme_on_grid=True)
    q = Quantizer(spec, w.shape, role="weight")
    q(w)
    q.enable_observer(False)
    assert torch.equal(q.scale, torch.full((16, 2), 0.5))
    assert torch.equal(q.zero_point, torch.full((16, 2), -1.0 if sign > 0 else 0.0))
    y = q(w)
    assert torch.equal(y[:, ::32], w[:, ::32])
    plain = Quantizer(QuantSpec(bits=4, granularity="per_group", group_size=32, axis=1), w.shape, role="weight")
    plain(w)
    plain.enable_observer(False)
    assert (y - w).norm() < (plain(w) - w).norm()  # 16 levels instead of 15 over the same range


def test_extreme_on_grid_needs_a_symmetric_full_range_grid():
    for bad in ({"symmetric": False}, {"narrow_range": True}):
        with pytest.raises(qat.ConfigError, match="extreme_on_grid"):
            QuantSpec(bits=4, extreme_on_grid=True, **bad)



def test_per_token_blocks_scale_each_block_of_the_last_dimension():
    """``per_token`` with ``group_size``: one dynamic scale per block of the last dimension, as ONNX
    Runtime's MatMulNBits quantizes its input for int8 products (symmetric, ``amax / 127``)."""
    spec = QuantSpec(bits=8, granularity="per_token", group_size=4, narrow_range=True)
    assert spec.describe() == "int8 per_token(4) sym narrow" and spec.qparam_shape((2, 3, 8), axis=2) == (2, 3, 2)
    q = Quantizer(spec, role="activation")
    x = torch.randn(2, 3, 8)
    blocks = x.reshape(2, 3, 2, 4)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    expected = ((blocks / scale).round().clamp(-127, 127) * scale).reshape(2, 3, 8)
    assert torch.equal(q(x), expected)
    assert torch.equal(q.fake_quantize(x), expected)
    with pytest.raises(ConfigError, match=r"group_size.*per_group` or `per_token"):
        QuantSpec(bits=8, group_size=4)
