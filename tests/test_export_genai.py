"""``qat.export_genai``: the decoder with a key-value cache that onnxruntime-genai runs.

A tiny random Llama (weights drawn wide enough that greedy decoding does not just repeat a token)
is prepared, calibrated and exported in several formats; ONNX Runtime's logits (whole sequence and
token by token through the cache) and greedy text through onnxruntime-genai's generation loop
must equal PyTorch's.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

import qat
from qat.errors import QATError
from qat.export import genai
from qat.export.parity import perplexity

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB, PAD = 256, 0
NEW_TOKENS = 32
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [3]]

W4G32 = {"bits": 4, "granularity": "per_group", "group_size": 32}
INT8_BLOCKS = {"bits": 8, "signed": True, "symmetric": True, "narrow_range": True, "granularity": "per_token", "group_size": 32}
FORMATS = {
    "w4g32": {"weight": W4G32, "activation": None},
    "w4g32_extreme_on_grid": {"weight": {**W4G32, "extreme_on_grid": True}, "activation": None},
    "uint4g32_affine": {"weight": {**W4G32, "signed": False, "symmetric": False}, "activation": None},
    "w3g32": {"weight": {**W4G32, "bits": 3}, "activation": None},
    "w4_per_channel": {"weight": {"bits": 4, "granularity": "per_channel"}, "activation": None},
    "w8g64": {"weight": {"bits": 8, "granularity": "per_group", "group_size": 64}, "activation": None},
    "w4g32_a8_blocks": {"weight": W4G32, "activation": INT8_BLOCKS},
}


def tiny_llama(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[model_type]
    sizes = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128}
    config = config_cls(**(sizes | overrides), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                        initializer_range=0.3)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # trained norms are not all ones (ones keep the quantized embedding's grid, full of exact ties)
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE without merges over 256 tokens (enough for the runtime to load)."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", *sorted(alphabet)[: VOCAB - 3]])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def prepared(recipe: dict | None, model_type: str = "llama", **overrides) -> torch.nn.Module:
    model = tiny_llama(model_type, **overrides)
    if recipe is None:
        return model
    model = qat.prepare(model, recipe)
    qat.calibrate(model, [torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))])
    return model


def torch_greedy(model: torch.nn.Module, batch: list[list[int]]) -> list[list[int]]:
    ids = torch.tensor(batch)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=(ids != PAD).long(), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=PAD)
    return out.tolist()


def genai_greedy(folder, batch: list[list[int]]) -> list[list[int]]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(batch[0]) + NEW_TOKENS, do_sample=False, batch_size=len(batch))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(batch, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)] for i in range(len(batch))]


@pytest.mark.parametrize("name", list(FORMATS))
def test_logits_match_pytorch_whole_and_cached(tmp_path, name):
    model = prepared(FORMATS[name])
    result = qat.export_genai(model, tmp_path / "out", tokenizer=byte_tokenizer())
    # MatMulNBits de-quantizes exactly the codes PyTorch uses, and in int8 blocks quantizes its input
    # as the input quantizer does: float rounding only
    tolerance = 1e-5
    assert result.parity.max_abs_diff <= tolerance * result.parity.output_scale
    assert result.cached_max_abs_diff <= tolerance * result.parity.output_scale
    stored = {entry["op"] for entry in result.layers.values()}
    assert stored == {"MatMulNBits", "GatherBlockQuantized"}, stored
    config = json.loads((result.folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["type"] == "llama"
    sidecar = json.loads((result.folder / "qparams.json").read_text())
    q_proj = sidecar["layers"]["model.layers.0.self_attn.q_proj"]
    assert q_proj["op"] == "MatMulNBits" and q_proj["weight_format"]["bits"] == FORMATS[name]["weight"]["bits"]
    assert q_proj["accuracy_level"] == (4 if FORMATS[name]["activation"] else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_int4_container_and_fused_projections(tmp_path):
    result = qat.export_genai(prepared(FORMATS["w4g32"]), tmp_path / "out", tokenizer=byte_tokenizer())
    graph = onnx.load(str(result.folder / "model.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("GatherBlockQuantized") == 1
    assert ops.count("MatMulNBits") == 2 * 5 + 1  # fused q/k/v, o, gate, up, down per layer, and the head (sharing the table)
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert {a.i for node in nbits for a in node.attribute if a.name in ("bits", "block_size")} == {4, 32}
    assert result.bytes < 0.5 * sum(p.numel() for p in tiny_llama().parameters()) * 4 / 2  # well under float32


def test_a_tied_table_is_stored_once_whatever_the_embeddings_own_block_would_be(tmp_path):
    """Per channel, the table alone would take the largest block dividing the hidden size (64 here);
    the head reads it in its input's blocks of 32, and the embedding takes the same, sharing it."""
    recipe = {"weight": {"bits": 4, "granularity": "per_channel"}, "activation": INT8_BLOCKS}
    result = qat.export_genai(prepared(recipe), tmp_path / "out", tokenizer=byte_tokenizer())
    embedding, head = result.layers["model.embed_tokens"], result.layers["lm_head"]
    assert embedding["op"] == "GatherBlockQuantized" and embedding["block_size"] == head["block_size"] == 32
    assert (embedding["codes"], embedding["scales"]) == (head["codes"], head["scales"])
    assert result.parity.max_abs_diff <= 1e-5 * result.parity.output_scale


def test_extreme_on_grid_stores_mirrored_blocks_and_no_zero_points(tmp_path):
    """Blocks whose largest-magnitude weight is positive (zero point one below the mid-point) are
    stored with mirrored codes and a negative scale, ONNX Runtime's own int4 layout: the same values."""
    result = qat.export_genai(prepared(FORMATS["w4g32_extreme_on_grid"]), tmp_path / "out", tokenizer=byte_tokenizer())
    assert result.parity.max_abs_diff <= 1e-5 * result.parity.output_scale
    graph = onnx.load(str(result.folder / "model.onnx")).graph
    nbits = [node for node in graph.node if node.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert nbits and all(len(node.input) == 3 for node in nbits)  # no zero points
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith(".scales")}
    assert all((s < 0).any() and (s > 0).any() for s in scales.values())


@pytest.mark.parametrize("name", ["w4g32", "w4g32_a8_blocks"])
def test_greedy_generation_through_onnxruntime_genai_equals_pytorch(tmp_path, name):
    model = prepared(FORMATS[name])
    folder = qat.export_genai(model, tmp_path / "out", tokenizer=byte_tokenizer()).folder
    for prompt in PROMPTS:
        expected = torch_greedy(model, [prompt])
        assert genai_greedy(folder, [prompt]) == expected, prompt
        assert len(set(expected[0][len(prompt):])) > 8  # real text-like output, not one token repeated
    batch = [PROMPTS[1], [*reversed(PROMPTS[1])]]
    assert genai_greedy(folder, batch) == torch_greedy(model, batch)


def test_right_padded_batch_equals_each_prompt_alone(tmp_path):
    """onnxruntime-genai pads a batch on the right (its attention mask is 0 only for trailing padding)."""
    model = prepared(FORMATS["w4g32"])
    folder = qat.export_genai(model, tmp_path / "out", tokenizer=byte_tokenizer()).folder
    longest = max(map(len, PROMPTS))
    rows = genai_greedy(folder, [p + [PAD] * (longest - len(p)) for p in PROMPTS])
    for prompt, row in zip(PROMPTS, rows, strict=True):
        alone = torch_greedy(model, [prompt])[0]
        assert row[longest:longest + NEW_TOKENS // 2] == alone[len(prompt):len(prompt) + NEW_TOKENS // 2], prompt


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_llama_family_types(tmp_path, model_type):
    model = prepared(FORMATS["w4g32"], model_type)
    result = qat.export_genai(model, tmp_path / "out", tokenizer=byte_tokenizer())
    assert result.parity.max_abs_diff <= 1e-5 * result.parity.output_scale
    assert json.loads((result.folder / "genai_config.json").read_text())["model"]["type"] == model_type
    assert genai_greedy(result.folder, [PROMPTS[0]]) == torch_greedy(model, [PROMPTS[0]])


def test_float_model_exports_with_plain_matmuls(tmp_path):
    model = tiny_llama()
    result = qat.export_genai(model, tmp_path / "out", tokenizer=byte_tokenizer())
    assert {entry["op"] for entry in result.layers.values()} == {"MatMul", "Gather"}
    assert result.parity.max_abs_diff <= 1e-5 * result.parity.output_scale


def test_runtime_perplexity_is_pytorchs_through_the_generation_loop(tmp_path):
    model = prepared(FORMATS["w4g32"])
    folder = qat.export_genai(model, tmp_path / "out", tokenizer=byte_tokenizer()).folder
    windows = [np.arange(i, i + 24) % VOCAB for i in (3, 40)]
    with torch.no_grad(), qat.deployed(model):
        expected = np.mean([perplexity(model(torch.from_numpy(w)[None]).logits.numpy(), w[None], None) for w in windows])
    assert genai.runtime_perplexity(folder, windows) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(QATError, match="at least one window, each of at least two tokens"):
        genai.runtime_perplexity(folder, [np.arange(1)])


# -- bad input: one line naming the problem, nothing left behind ---------------------------------------


def _fails(tmp_path, match, model=None, tokenizer="default", folder="out"):
    model = prepared(FORMATS["w4g32"]) if model is None else model
    with pytest.raises(QATError, match=match):
        qat.export_genai(model, tmp_path / folder, tokenizer=byte_tokenizer() if tokenizer == "default" else tokenizer)
    assert not [p for p in tmp_path.iterdir() if p.name != "keep"]


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    _fails(tmp_path, r"`gpt2`.*not supported; supported: llama, mistral, qwen2", model=gpt2)
    _fails(tmp_path, r"needs a Hugging Face causal language model", model=torch.nn.Linear(2, 2))


def test_missing_tokenizer(tmp_path):
    _fails(tmp_path, r"needs the model's tokenizer", tokenizer=None)
    _fails(tmp_path, r"tokenizer: `.*nowhere` does not exist", tokenizer=tmp_path / "nowhere")


def test_group_size_that_no_block_divides(tmp_path):
    _fails(tmp_path, r"layer `(model\.\w+|lm_head)`: weight group_size 24 is not a multiple of a MatMulNBits block size",
           model=prepared({"weight": {**W4G32, "group_size": 24}, "activation": None}))


def test_head_size_the_attention_kernel_cannot_take(tmp_path):
    _fails(tmp_path, r"head size 8: ONNX Runtime's GroupQueryAttention takes multiples of 16",
           model=prepared(FORMATS["w4g32"], num_attention_heads=8, num_key_value_heads=4))


def test_input_format_the_kernel_cannot_compute(tmp_path):
    _fails(tmp_path, r"layer `\w+`: MatMulNBits quantizes its input only as symmetric int8 blocks.*input: uint8 per_token",
           model=prepared({"weight": W4G32, "activation": {"bits": 8, "granularity": "per_token"}}))


def test_folder_that_is_not_empty(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    _fails(tmp_path, r"`.*keep` exists and is not empty", folder="keep")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"


# -- the command line: qat export --genai, then qat generate -------------------------------------------


LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def save_letter_tokenizer(path) -> None:
    """LitLlama's vocabulary is 64 tokens: a byte-level BPE over letters, the space and eight digits."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *LETTERS, "Ġ", *"01234567"])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.save(str(path))


def test_callback_writes_the_folder_when_training_ends_and_generates_as_pytorch(tmp_path):
    """GenaiFolderExport in a Lightning run: the folder is written and verified when fit ends, and
    greedy continuations through onnxruntime-genai equal PyTorch's token for token; a folder that
    is not empty stops the run before its first step."""
    pytest.importorskip("onnxruntime_genai")
    from lightning_models import LitLlama, trainer

    from qat.lightning import GenaiFolderExport, QuantizationAwareTraining

    save_letter_tokenizer(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    export = GenaiFolderExport("genai", tokenizer=tmp_path / "tokenizer.json", prompts=["abc", "Hello world"], max_new_tokens=12)
    quantize = QuantizationAwareTraining(FORMATS["w4g32_a8_blocks"], schedule={"fake_quant_from": 1}, print_summary=False)
    trainer(max_steps=4, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[quantize, export]).fit(LitLlama(heads=2))
    assert (tmp_path / "genai" / "genai_config.json").exists() and export.result.folder == tmp_path / "genai"
    assert "16 of 16 layers on n-bit kernels" in str(export.result)
    check = export.generation
    assert [len(tokens) for tokens in check.pytorch] == [12, 12] and check.runtime == check.pytorch and check.agreeing == [12, 12]
    assert "24 of 24 new tokens agree" in check.describe()

    model = LitLlama(heads=2)
    before = copy.deepcopy(model.state_dict())
    again = GenaiFolderExport("genai", tokenizer=tmp_path / "tokenizer.json")
    with pytest.raises(QATError, match=r"GenaiFolderExport: .*exists and is not empty"):
        trainer(max_steps=4, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[again]).fit(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not one step was taken


def test_cli_exports_a_checkpoint_and_generates_text(tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    from lightning_models import LitLlama, trainer

    from qat.app.cli import main
    from qat.lightning import QuantizationAwareTraining

    torch.manual_seed(0)
    trainer(max_steps=4, limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=True,
            callbacks=[QuantizationAwareTraining(FORMATS["w4g32_a8_blocks"], schedule={"fake_quant_from": 1}, print_summary=False)]
            ).fit(LitLlama(heads=2))  # ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of 16
    checkpoint = str(next(tmp_path.rglob("*.ckpt")))
    save_letter_tokenizer(tmp_path / "tokenizer.json")
    out = tmp_path / "genai"
    command = ["export", "--genai", "--model", "lightning_models:LitLlama", "--init-args", '{"heads": 2}', "--checkpoint", checkpoint,
               "-o", str(out)]
    assert main(command) == 2
    assert "--genai needs --tokenizer" in capsys.readouterr().err
    assert main([*command, "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    assert "16 of 16 layers on n-bit kernels" in capsys.readouterr().out  # 7 per layer, the embedding and the head
    assert main(["generate", str(out), "--prompt", "abc", "--raw", "--max-new-tokens", "6"]) == 0
    reply = capsys.readouterr().out
    assert len(reply.strip()) >= 3 and set(reply.strip()) <= set("".join(LETTERS) + " 01234567")
    assert main([*command, "--tokenizer", str(tmp_path / "tokenizer.json")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "abc"]) == 2
    assert "has no genai_config.json" in capsys.readouterr().err
