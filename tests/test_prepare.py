"""qat.prepare: swapping, BatchNorm folding, rules, reports; qat.summary and qat.strip."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from tiny_models import EVERYTHING_RECIPE, TinyCNN, assert_every_parameter_accounted_for
from torch import nn

import qat
from qat.modules import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantizedLayer,
    QuantLinear,
)


class AllLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.c3 = nn.Conv3d(8, 4, 1)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, idx):
        x = self.emb(idx).transpose(1, 2)  # (B, 8, T)
        x = self.c1(x)
        x = self.c2(x.unsqueeze(-1).expand(-1, -1, -1, 4))  # (B, 8, T, 4)
        x = self.c3(x.unsqueeze(2)).squeeze(2)  # (B, 4, T, 4)
        x = self.up(x)  # (B, 6, 2T, 8)
        return self.fc(x.mean((2, 3)))


def test_every_supported_layer_is_swapped_and_trains():
    model = AllLayers()
    weights = {name: p for name, p in model.named_parameters()}
    idx = torch.randint(0, 20, (2, 5))
    reference = model(idx)
    qat.prepare(model, {"weight": {"bits": 4}})
    expected = {"emb": QuantEmbedding, "c1": QuantConv1d, "c2": QuantConv2d, "c3": QuantConv3d, "up": QuantConvTranspose2d,
                "fc": QuantLinear}
    for name, cls in expected.items():
        assert type(getattr(model, name)) is cls
    assert model.emb.input_quantizer is None and model.fc.input_quantizer is not None
    assert model.up.weight_quantizer.axis == 1  # ConvTranspose: output channels on axis 1
    for name, p in model.named_parameters():  # the same Parameter objects: optimizers stay valid
        if name in weights:
            assert p is weights[name]
    out = model(idx)
    assert out.shape == reference.shape and not torch.equal(out, reference)
    out.sum().backward()
    assert all(p.grad is not None for p in weights.values())
    qat.set_fake_quant(model, False)
    torch.testing.assert_close(model(idx), reference)  # fake-quant off: the float model again


def test_per_group_weights_use_the_input_axis():
    model = nn.Sequential(nn.Linear(64, 8), nn.ConvTranspose2d(64, 4, 1))
    qat.prepare(model, {"weight": {"granularity": "per_group", "group_size": 16}, "activation": None})
    assert model[0].weight_quantizer.scale.shape == (8, 4)
    assert model[1].weight_quantizer.scale.shape == (4, 4, 1, 1)


# -- BatchNorm folding ---------------------------------------------------------------------------


def test_conv_bn_pairs_are_found_and_folded_without_listing_them():
    x = torch.randn(4, 3, 8, 8)
    model = qat.prepare(TinyCNN(), example_inputs=x)
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.Identity)
    assert isinstance(model.conv1.bn, nn.BatchNorm2d) and isinstance(model.dw.bn, nn.BatchNorm2d)
    assert qat.summary(model).float_layers == {}
    assert all(model.conv1.bn.running_mean == 0)  # finding pairs ran the model without training BatchNorm


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_folded_model_with_fake_quant_off_computes_the_float_model(mode):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    float_model = TinyCNN()
    with torch.no_grad():
        float_model.bn1.running_var.uniform_(0.5, 2.0)
        float_model.bn1.weight.uniform_(0.5, 2.0)
    prepared = qat.prepare(copy.deepcopy(float_model), example_inputs=x)
    qat.set_fake_quant(prepared, False)
    float_model.train(mode == "train")
    prepared.train(mode == "train")
    torch.testing.assert_close(prepared(x), float_model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prepared.conv1.bn.running_mean, float_model.bn1.running_mean)


def test_frozen_bn_stats_stay_put_in_training_and_survive_train_calls():
    x = torch.randn(8, 3, 8, 8)
    model = qat.prepare(TinyCNN(), example_inputs=x).train()
    model(x)
    qat.freeze_bn_stats(model)
    model.train()  # must not unfreeze
    before = model.conv1.bn.running_mean.clone()
    model(x * 2 + 1)
    assert torch.equal(model.conv1.bn.running_mean, before)
    assert model.conv1.state_dict()["_extra_state"] == {"bn_frozen": True}


def test_frozen_folded_conv_equals_conv_with_folded_weight_and_bias():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    model = qat.prepare(TinyCNN(), {"activation": None}, example_inputs=x)
    model.train()
    model(x)
    qat.freeze_bn_stats(model)
    qat.set_observers(model, False)
    conv = model.conv1
    weight, bias = conv.inference_weight_bias()
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, weight, bias, padding=1), rtol=1e-5, atol=1e-5)


def test_zero_gamma_batchnorm_folds_without_nan_and_keeps_learning_gamma():
    """Zero-initialised residual BatchNorms (timm's ResNet) make the fold factor 0."""
    x = torch.randn(8, 3, 8, 8)
    float_model = TinyCNN()
    nn.init.zeros_(float_model.bn1.weight)
    nn.init.constant_(float_model.bn1.bias, 0.5)
    model = qat.prepare(copy.deepcopy(float_model), {"weight": {"bits": 4}}, example_inputs=x)
    out = model(x)
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all() and model.conv1.bn.weight.grad.abs().sum() > 0  # γ is not stuck at 0
    # with fake quantization off, γ's gradient is the float model's
    model.zero_grad()
    qat.set_fake_quant(model, False)
    model(x).pow(2).mean().backward()
    float_model(x).pow(2).mean().backward()
    torch.testing.assert_close(model.conv1.bn.weight.grad, float_model.bn1.weight.grad, rtol=1e-4, atol=1e-6)
    model.eval()
    qat.set_observers(model, False)
    qat.set_fake_quant(model, True, role="weight")
    torch.testing.assert_close(qat.strip(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_folded_conv_under_bf16_autocast_keeps_activations_in_bf16_and_saves_no_extra_copy():
    """A float32 fold factor once promoted every activation after a folded conv to float32
    under autocast (3× a float step's memory on a GPU), and the division kept the conv's output."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    float_model = TinyCNN()
    model = qat.prepare(copy.deepcopy(float_model), {"weight": {"bits": 4}}, example_inputs=x).train()
    model(x)
    saved, outputs = {}, {}

    def run(m, bn_name):
        hook = getattr(m, bn_name).register_forward_hook(lambda mod, i, out: outputs.__setitem__(bn_name, out))
        activations = []
        with (torch.autograd.graph.saved_tensors_hooks(lambda t: activations.append(t) or t, lambda t: t),
              torch.autocast("cpu", dtype=torch.bfloat16)):
            m(x)
        hook.remove()
        # activation-sized tensors (batch first, 4-D), once each, the input image aside
        unique = {t.untyped_storage().data_ptr(): t for t in activations if t.ndim == 4 and t.shape[0] == 4}
        return [t for t in unique.values() if t.data_ptr() != x.data_ptr()]

    saved["float"] = run(float_model, "bn1")
    saved["qat"] = run(model, "conv1")
    assert outputs["bn1"].dtype == outputs["conv1"].dtype == torch.bfloat16
    assert all(t.dtype != torch.float32 for t in saved["qat"])
    # beyond the float model's: the quantized inputs of the two convs (as bf16) and their one-byte masks
    extra = sum(t.untyped_storage().nbytes() for t in saved["qat"]) - sum(t.untyped_storage().nbytes() for t in saved["float"])
    assert extra <= 2 * (2 + 1) * 4 * 8 * 8 * 8


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv output has a second consumer: folding would change it


def test_bn_not_folded_when_the_conv_output_has_other_consumers_or_without_example_inputs():
    x = torch.randn(2, 3, 4, 4)
    model = qat.prepare(SharedOutput(), example_inputs=x)
    assert "also used elsewhere" in qat.summary(model).float_layers["bn"]
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bn is None
    model = qat.prepare(TinyCNN())
    assert "pass example_inputs" in qat.summary(model).float_layers["bn1"]
    model = qat.prepare(TinyCNN(), {"fold_bn": False}, example_inputs=torch.randn(2, 3, 8, 8))
    assert "fold_bn false" in qat.summary(model).float_layers["bn2"]


def test_example_inputs_that_do_not_run_give_a_clear_error():
    with pytest.raises(qat.QATError, match="example inputs do not run through the model"):
        qat.prepare(TinyCNN(), example_inputs=torch.randn(2, 5, 8, 8))


# -- rules and errors ----------------------------------------------------------------------------


def test_rules_overrides_and_skips():
    x = torch.randn(2, 3, 8, 8)
    recipe = {
        "weight": {"bits": 4},
        "rules": [
            {"names": "conv1|fc2", "weight": {"bits": 8}},  # first conv and classifier at 8 bits
            {"types": ["Linear"], "activation": {"bits": 16, "signed": True}},
            {"names": "conv1", "activation": None},
        ],
        "skip": ["dw"],
    }
    model = qat.prepare(TinyCNN(), recipe, example_inputs=x)
    assert model.conv1.weight_quantizer.spec.bits == 8 and model.conv1.input_quantizer is None
    assert model.fc2.weight_quantizer.spec.bits == 8 and model.fc1.weight_quantizer.spec.bits == 4
    assert model.fc1.input_quantizer.spec.bits == 16
    assert type(model.dw) is nn.Conv2d
    float_layers = qat.summary(model).float_layers
    assert "skipped by recipe skip[0]" in float_layers["dw"]
    assert "convolution `dw` is left float" in float_layers["bn2"]


def test_a_rule_that_matches_nothing_is_an_error_that_lists_layer_names():
    with pytest.raises(qat.QATError, match=r"`rules\[0\]`: names='classifier' matches no layer of TinyCNN.*conv1"):
        qat.prepare(TinyCNN(), {"rules": [{"names": "classifier", "weight": {"bits": 8}}]})


def test_preparing_twice_or_quantizing_nothing_is_an_error():
    model = qat.prepare(TinyCNN())
    with pytest.raises(qat.QATError, match="already prepared"):
        qat.prepare(model)
    with pytest.raises(qat.QATError, match="quantizes no layer"):
        qat.prepare(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(qat.QATError, match="quantizes no layer"):
        qat.prepare(TinyCNN(), {"skip": [".*"]})
    with pytest.raises(qat.QATError, match=r"wrap it: nn.Sequential\(layer\)"):
        qat.prepare(nn.Linear(4, 4))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.custom = CustomLinear(8, 8)
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        x = self.norm(self.attn(x, x, x)[0])
        return self.fc(self.custom(x)) * self.scale


class CustomLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_layers_left_float_are_listed_with_reasons_and_cover_every_parameter():
    model = qat.prepare(Mixed())
    model(torch.randn(2, 3, 8)).sum().backward()
    float_layers = qat.summary(model).float_layers
    assert "reads its weights directly" in float_layers["attn"]
    assert "normalization layer" in float_layers["norm"]
    assert "subclasses Linear" in float_layers["custom"]
    assert float_layers[""] == "no quantized twin for Mixed (parameters: scale)"
    assert isinstance(model.attn.out_proj, nn.Linear) and not isinstance(model.attn.out_proj, QuantizedLayer)
    assert "(the model itself)" in str(qat.summary(model))
    assert_every_parameter_accounted_for(model)


def test_a_module_used_twice_gets_one_twin_at_both_places_and_tied_weights_stay_tied():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    qat.prepare(model)
    assert isinstance(model[0], QuantLinear) and model[0] is model[2]
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    lm = nn.Sequential(emb, head)
    qat.prepare(lm, {"rules": [{"types": ["Embedding"], "weight": {"granularity": "per_group", "group_size": 2}}]})
    assert lm[0].weight is lm[1].weight


def tied_lm() -> nn.Sequential:
    emb, head = nn.Embedding(10, 8, padding_idx=3), nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, head)


def test_a_tied_weight_quantized_alike_gets_one_quantizer_and_unlike_two():
    """The embedding and the head that hold one table share its weight quantizer when the recipe
    quantizes them alike (one table stored, one set of scales learned from both uses); given
    different formats, each keeps its own; a state dict round-trips either way."""
    spec = {"bits": 4, "granularity": "per_group", "group_size": 4, "learnable": True}
    lm = qat.prepare(tied_lm(), {"rules": [{"types": ["Embedding", "Linear"], "weight": spec}]})
    assert lm[0].weight_quantizer is lm[1].weight_quantizer
    assert sum(1 for name, _ in lm.named_parameters() if name.endswith("scale")) == 1
    ids = torch.tensor([[1, 2, 3, 1]])
    qat.calibrate(lm, [ids])
    lm(ids).sum().backward()
    assert lm[0].weight_quantizer.scale.grad.abs().sum() > 0  # from both uses
    fresh = qat.prepare(tied_lm(), {"rules": [{"types": ["Embedding", "Linear"], "weight": spec}]})
    fresh.load_state_dict(lm.state_dict())
    assert torch.equal(fresh(ids), lm(ids))
    apart = qat.prepare(tied_lm(), {"rules": [{"types": ["Embedding"], "weight": spec},
                                              {"types": ["Linear"], "weight": {**spec, "bits": 8}}]})
    assert apart[0].weight_quantizer is not apart[1].weight_quantizer


@pytest.mark.parametrize("weight", [
    {"bits": 4, "granularity": "per_group", "group_size": 4, "learnable": True},
    {"bits": 4, "granularity": "per_channel", "symmetric": False, "learnable": True},
    {"bits": 8},
])
def test_an_embedding_fake_quantizes_the_rows_it_reads_as_the_whole_table(weight):
    """The rows a batch reads, fake-quantized with their own scales: the values of quantizing the
    whole table and looking up, bit for bit; the same gradients (the padding row's none), summed in
    another order; the observer still sees the whole table."""
    torch.manual_seed(0)
    model = qat.prepare(nn.Sequential(nn.Embedding(50, 16, padding_idx=3)), {"rules": [{"types": ["Embedding"], "weight": weight}]})
    ids = torch.randint(0, 25, (4, 20))  # rows 25 to 49 are never read
    ids[0, :3] = 3
    qat.calibrate(model, [ids])
    whole_table = copy.deepcopy(model[0].weight_quantizer)
    whole_table.observe(model[0].weight.detach())
    assert torch.equal(whole_table.scale, model[0].weight_quantizer.scale)
    qat.set_observers(model, False)
    assert model[0]._rows_alone()
    grad = torch.randn(4, 20, 16)
    results = []
    for rows in (True, False):
        copy_ = copy.deepcopy(model)
        if not rows:
            copy_[0]._rows_alone = lambda: False
        y = copy_(ids)
        y.backward(grad)
        results.append((y.detach(), {name: p.grad for name, p in copy_.named_parameters()}))
    (y_rows, grads_rows), (y_table, grads_table) = results
    assert torch.equal(y_rows, y_table)
    assert grads_rows.keys() == grads_table.keys()
    for name, g in grads_table.items():
        torch.testing.assert_close(grads_rows[name], g, rtol=1e-5, atol=1e-6)
    assert not grads_rows["0.weight"][3].any()
    if "0.weight_quantizer.scale" in grads_rows and grads_rows["0.weight_quantizer.scale"].ndim:
        assert not grads_rows["0.weight_quantizer.scale"][3].any()


def test_prepared_model_state_dict_round_trips_into_a_fresh_prepared_model(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    model = qat.prepare(TinyCNN(), EVERYTHING_RECIPE, example_inputs=x)
    for _ in range(2):
        model(x).sum().backward()
    qat.set_observers(model, False)
    qat.freeze_bn_stats(model)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = qat.prepare(TinyCNN(), EVERYTHING_RECIPE, example_inputs=x)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert fresh.conv1.bn_frozen and not fresh.fc1.input_quantizer.observer_enabled


def test_prepared_models_deepcopy_and_pickle():
    x = torch.randn(2, 3, 8, 8)
    model = qat.prepare(TinyCNN(), EVERYTHING_RECIPE, example_inputs=x).eval()
    model(x)
    qat.set_observers(model, False)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x))
        assert clone.qat_state.recipe == model.qat_state.recipe


# -- summary and strip ---------------------------------------------------------------------------


def test_summary_reports_specs_ranges_and_sqnr():
    x = torch.randn(4, 3, 8, 8)
    model = qat.prepare(TinyCNN(), EVERYTHING_RECIPE, example_inputs=x)
    before = qat.summary(model)
    assert all(r.weight_sqnr_db is None for r in before.layers)  # nothing observed yet
    model(x)
    report = qat.summary(model)
    rows = {r.name: r for r in report.layers}
    assert list(rows) == ["conv1", "dw", "fc1", "fc2"]
    assert rows["conv1"].bn_folded and rows["fc1"].weight == "int4 per_group(32) sym mse"
    assert rows["fc2"].activation == "int8 per_token sym" and rows["fc2"].input_range is None
    lo, hi = rows["conv1"].input_range
    assert lo <= x.min().item() and hi >= x.max().item()
    assert all(5 < r.weight_sqnr_db < 40 for r in report.layers)  # 4-bit weights: ~15–25 dB
    text = str(report)
    assert "conv1" in text and "Conv2d +BN" in text and "Left float (0)" in text


def test_strip_bakes_quantized_weights_into_a_float_model():
    x = torch.randn(4, 3, 8, 8)
    model = qat.prepare(TinyCNN(), EVERYTHING_RECIPE, example_inputs=x)
    model(x)
    model.eval()
    qat.set_observers(model, False)
    stripped = qat.strip(model)
    assert not any(isinstance(m, (QuantizedLayer, qat.Quantizer)) for m in stripped.modules())
    assert type(stripped.conv1) is nn.Conv2d and not hasattr(stripped, "qat_state")
    assert not hasattr(stripped.conv1, "bn_frozen")
    qat.set_fake_quant(model, False, role="activation")
    torch.testing.assert_close(stripped(x), model(x), rtol=1e-5, atol=1e-6)
    assert isinstance(model.conv1, QuantizedLayer)  # the prepared model is untouched
    buffer = io.BytesIO()
    torch.save(stripped.state_dict(), buffer)  # a plain state dict
    assert not any("quantizer" in k for k in stripped.state_dict())


def test_strip_refuses_an_uncalibrated_model():
    model = qat.prepare(TinyCNN())
    with pytest.raises(qat.QATError, match="layer `conv1` was never calibrated"):
        qat.strip(model)
    with pytest.raises(qat.QATError, match="not prepared"):
        qat.summary(TinyCNN())
