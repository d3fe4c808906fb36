"""Real architectures (random init, small inputs): prepare → forward/backward → finite loss →
every intended layer quantized, every other parameterised layer listed with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import assert_every_parameter_accounted_for

import qat
from qat.modules import QuantConvNd, QuantizedLayer, twin_for

FIRST_LAYERS = "conv1|conv_stem|features\\.0\\.0|stem\\.0|patch_embed\\.proj"  # each model's first layer
VISION_RECIPE = {"weight": {"bits": 4}, "rules": [{"names": FIRST_LAYERS, "weight": {"bits": 8}}]}
LLM_RECIPE = {
    "weight": {"bits": 4, "granularity": "per_group", "group_size": 16},
    "activation": {"granularity": "per_token", "signed": True, "symmetric": True},
}


def _vision(name):
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    builders = {
        "torchvision.resnet18": lambda: torchvision.models.resnet18(num_classes=10),
        "torchvision.mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        "timm.resnet18": lambda: timm.create_model("resnet18", num_classes=10),
        "timm.efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10),
        "timm.vit_tiny_patch16_224": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32),
        "timm.convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10),
    }
    return builders[name]()


def _language(name):
    transformers = pytest.importorskip("transformers")
    small = {"vocab_size": 128, "max_position_embeddings": 64}
    builders = {
        "transformers.LlamaForCausalLM": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **small)),
        "transformers.GPT2LMHeadModel": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
        "transformers.BertModel": lambda: transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **small)),
    }
    return builders[name]()


def _assert_accounted_for(model, expect_all_bn_folded: bool):
    report = qat.summary(model)
    float_layers = report.float_layers
    # every layer of a type with a quantized twin was swapped: none is left float
    assert [n for n, m in model.named_modules() if twin_for(m) is not None] == []
    assert_every_parameter_accounted_for(model)
    for name, reason in float_layers.items():
        assert reason, name
    if expect_all_bn_folded:
        assert not any("BatchNorm" in reason for reason in float_layers.values())
        assert any(isinstance(m, QuantConvNd) and m.bn is not None for m in model.modules())
    assert all(q.calibrated for _, q in qat.quantizers(model))
    assert all(r.weight_sqnr_db is not None and r.weight_sqnr_db > 5 for r in report.layers)
    return report


@pytest.mark.parametrize("name,folds_bn", [
    ("torchvision.resnet18", True),
    ("torchvision.mobilenet_v3_small", True),
    ("timm.resnet18", True),
    ("timm.efficientnet_b0", True),
    ("timm.vit_tiny_patch16_224", False),
    ("timm.convnext_atto", False),
])
def test_vision_models(name, folds_bn):
    model = _vision(name)
    x = torch.randn(2, 3, 32, 32)
    qat.prepare(model, VISION_RECIPE, example_inputs=x)
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    report = _assert_accounted_for(model, folds_bn)
    first = report.layers[0]
    assert first.weight.startswith("int8") and all(r.weight.startswith("int4") for r in report.layers[1:])


@pytest.mark.parametrize("name", ["transformers.LlamaForCausalLM", "transformers.GPT2LMHeadModel", "transformers.BertModel"])
def test_language_models(name):
    model = _language(name)
    ids = torch.randint(0, 128, (2, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    qat.prepare(model, LLM_RECIPE, example_inputs=inputs)
    out = model(**inputs, labels=ids) if hasattr(model, "lm_head") else model(**inputs)
    loss = out.loss if hasattr(model, "lm_head") else out.last_hidden_state.pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    report = _assert_accounted_for(model, expect_all_bn_folded=False)
    assert all("normalization layer" in reason for reason in report.float_layers.values())
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, QuantizedLayer)}
    assert "QuantEmbedding" in kinds and ({"QuantLinear", "QuantHFConv1D"} & kinds)
    linear = next(m for m in model.modules() if isinstance(m, QuantizedLayer) and m.input_quantizer is not None)
    assert linear.input_quantizer.spec.dynamic and linear.weight_quantizer.spec.group_size == 16
