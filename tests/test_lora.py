"""QAT with LoRA adapters (Hugging Face peft): the weight fake-quantized in training is the merged one the
device runs, the base weights stay frozen while the adapters train, and strip/export merge and quantize once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat
from qat.core.quantizer import Quantizer
from qat.errors import QATError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from qat.modules.lora import QuantLoRALinear  # noqa: E402  (needs peft)

RECIPE = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 16}, "activation": None}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_llama(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, lora)


def tokens(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))


def test_the_merged_weight_is_what_is_fake_quantized():
    model = qat.prepare(lora_llama(), RECIPE)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLoRALinear)
    assert not isinstance(layer.base_layer, qat.modules.QuantizedLayer)  # the base is not quantized a second time
    x = torch.randn(3, 32)
    merged = layer.base_layer.weight + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    y = layer(x)  # observes the merged weight, then fake-quantizes it
    assert torch.equal(y, nn.functional.linear(x, layer.weight_quantizer.fake_quantize(merged), layer.base_layer.bias))
    # the state dict keeps peft's names (adapters can still be saved), plus the quantizers'
    keys = model.state_dict().keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.weight_quantizer.scale" in keys


def test_adapters_train_through_the_quantized_merged_weight_and_the_base_stays_frozen():
    model = qat.prepare(lora_llama(), RECIPE)
    qat.calibrate(model, [{"input_ids": tokens()}], progress=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        batch = tokens(seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    assert all(not torch.equal(after[name], value) for name, value in adapters.items())


def test_strip_and_export_merge_the_adapters_and_quantize_once(tmp_path):
    model = qat.prepare(lora_llama(), RECIPE)
    qat.calibrate(model, [{"input_ids": tokens()}], progress=False)
    model.eval()
    batch = tokens(2, seed=5)
    with torch.no_grad():
        trained = model(input_ids=batch).logits
        stripped = qat.strip(model)
        head = stripped.base_model.model.model.layers[0].self_attn.q_proj
        assert type(head) is nn.Linear  # the adapters merged away
        assert torch.equal(stripped(input_ids=batch).logits, trained)  # what was trained is what is deployed
    result = qat.export_onnx(model, {"input_ids": batch}, tmp_path / "lora.onnx", artifacts=["device"])
    assert any("layers.0.self_attn.q_proj" in name for name in result.device.integer_weights)


def test_adapter_dropout_is_refused_with_the_layer_named():
    with pytest.raises(QATError, match=r"layer `base_model\.model\.model\.layers\.0\.self_attn\.q_proj`: .*lora_dropout=0\.1"):
        qat.prepare(lora_llama(dropout=0.1), RECIPE)


def test_quantizers_of_a_lora_layer_are_the_layers_own():
    model = qat.prepare(lora_llama(), RECIPE)
    names = [name for name, module in model.named_modules() if isinstance(module, Quantizer)]
    assert "base_model.model.model.layers.0.self_attn.q_proj.weight_quantizer" in names
    assert not any(".base_layer." in name for name in names)


def test_the_callback_trains_a_lightning_module_that_holds_a_peft_model():
    import lightning.pytorch as pl
    from lightning_models import TokenData, trainer
    from torch.utils.data import DataLoader

    from qat.lightning import QuantizationAwareTraining

    class LitLoRA(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = lora_llama()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

        def train_dataloader(self):
            return DataLoader(TokenData(16), batch_size=4)

    module = LitLoRA()
    base = module.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    trainer(max_steps=3, callbacks=[QuantizationAwareTraining(RECIPE, print_summary=False)]).fit(module)
    layer = module.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLoRALinear) and layer.weight_quantizer.calibrated
    assert torch.equal(layer.base_layer.weight, base)


def test_export_genai_takes_the_peft_model_and_stores_the_merged_weights(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from test_export_genai import byte_tokenizer, tiny_llama

    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    model = qat.prepare(peft.get_peft_model(tiny_llama(), lora),
                        {"weight": {"bits": 4, "granularity": "per_group", "group_size": 32}, "activation": None})
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    qat.calibrate(model, [{"input_ids": ids}], progress=False)
    result = qat.export_genai(model, tmp_path / "out", tokenizer=byte_tokenizer())  # checks the runtime against PyTorch
    assert result.layers["base_model.model.model.layers.0.self_attn.q_proj"]["op"] == "MatMulNBits"
