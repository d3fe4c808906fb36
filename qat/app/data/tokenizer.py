"""Tokenizers for the text DataModules: UTF-8 bytes, a byte-level BPE trained here, or a saved one.

- :class:`ByteTokenizer`: ids are the UTF-8 bytes (vocabulary 256). Nothing to train or to ship,
  and every string round-trips; sequences are ~2× longer than with a small BPE.
- :func:`bpe_tokenizer`: a byte-level BPE trained with the ``tokenizers`` library on the train
  split only (never on val/test text), cached as ``tokenizer.json`` under the cache folder.
- :func:`load_tokenizer`: a ``tokenizer.json`` file, a local Hugging Face tokenizer folder or the
  tokenizer a GGUF file carries (:func:`qat.tokenizer_files.load_hf_tokenizer`, which the
  exporter uses too).

Both kinds offer ``encode``, ``decode``, ``encode_all`` (many texts → one array of ids),
``vocab_size`` and ``fingerprint`` (what the token cache is keyed by).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import Progress

from qat.app.data.corpus import FORMAT, cache_root
from qat.app.models import resolve_model
from qat.atomic import write_atomic
from qat.errors import QATError
from qat.tokenizer_files import load_hf_tokenizer

if TYPE_CHECKING:
    import tokenizers

SPECIAL_TOKENS = ("<|endoftext|>",)
"""Added to a trained BPE (id 0), so a generation loop has an end-of-text id, as GPT-2's has."""
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS) + 1
"""The 256 byte symbols, the special tokens and at least one merge."""
BATCH_CHARS = 1_000_000
"""Characters handed to the Rust tokenizer per call: large enough for its threads, small enough for a live progress bar."""


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256).

    Written by hand rather than with ``tokenizers``: it is five lines, has no training and no file,
    and needs no optional dependency, so the offline LLM recipe runs with torch alone.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("é!"), tok.decode(tok.encode("é!"))
        ([195, 169, 33], 'é!')
    """

    vocab_size = 256
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")  # a block may cut a character in two

    def encode_all(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """The ids of ``texts`` one after another (int64)."""
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` (Rust): a BPE trained here, a ``tokenizer.json``, or the backend
    of a Hugging Face fast tokenizer. Encodes without special tokens: a causal LM's blocks are cut
    from running text."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str) -> None:
        self.backend, self.source = backend, source
        self.fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def encode_all(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """The ids of ``texts`` one after another (int64), encoded in parallel batches of about
        :data:`BATCH_CHARS` characters, with a progress bar when ``progress``."""
        batches: list[list[str]] = [[]]
        size = 0
        for text in texts:
            if size > BATCH_CHARS:
                batches.append([])
                size = 0
            batches[-1].append(text)
            size += len(text)
        ids: list[np.ndarray] = []
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("tokenizing", total=sum(map(len, texts)))
            for batch in batches:
                for encoding in self.backend.encode_batch(batch, add_special_tokens=False):
                    ids.append(np.asarray(encoding.ids, dtype=np.int64))
                bar.advance(task, sum(map(len, batch)))
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` atomically (loadable by :func:`load_tokenizer` and ``PreTrainedTokenizerFast``)."""
        return write_atomic(Path(path), self.backend.to_str(), make_parents=True)

    def __repr__(self) -> str:
        return f"FastTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _require_tokenizers() -> Any:
    if importlib.util.find_spec("tokenizers") is None:
        raise QATError("a BPE or tokenizer.json tokenizer needs the `tokenizers` library: pip install tokenizers "
                       "(or use tokenizer='byte')")
    import tokenizers

    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int = 512) -> FastTokenizer:
    """Train a byte-level BPE (GPT-2's pre-tokenizer and decoder, the 256 byte symbols as its
    alphabet, :data:`SPECIAL_TOKENS` first) on ``texts``. A small corpus may stop short of
    ``vocab_size`` when no pair is left to merge."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise QATError(f"vocab_size must be an integer ≥ {MIN_BPE_VOCAB} for a byte-level BPE (256 bytes, "
                       f"{len(SPECIAL_TOKENS)} special token, at least one merge); got `{vocab_size!r}`")
    tk = _require_tokenizers()
    backend = tk.Tokenizer(tk.models.BPE())
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty())
    backend.train_from_iterator(texts, trainer)
    return FastTokenizer(backend, f"bpe{vocab_size}")


def bpe_tokenizer(train_texts: Sequence[str], vocab_size: int = 512, cache_dir: str | os.PathLike[str] | None = None) -> FastTokenizer:
    """:func:`train_bpe` on ``train_texts``, cached as ``tokenizers/bpe<vocab>-<key>/tokenizer.json``
    where the key hashes the texts and the settings: the same train split loads, never retrains."""
    digest = hashlib.sha256(f"{FORMAT}\0{vocab_size}\0{SPECIAL_TOKENS}".encode())
    for text in train_texts:
        digest.update(text.encode())
    path = cache_root(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{digest.hexdigest()[:16]}" / "tokenizer.json"
    if path.is_file():
        try:
            return FastTokenizer(_require_tokenizers().Tokenizer.from_file(str(path)), str(path))
        except Exception:  # a damaged cache entry (the Rust loader raises plain Exception): train again
            pass
    tokenizer = train_bpe(train_texts, vocab_size)
    tokenizer.save(path)
    tokenizer.source = str(path)
    return tokenizer


def check_tokenizer_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a ``.json`` or ``.gguf`` file or a folder (a packaged model's name gives its
    file, :func:`qat.app.models.resolve_model`); else an error that names it."""
    path = Path(resolve_model(str(path))).expanduser()
    if not path.exists():
        raise QATError(f"tokenizer: `{path}` does not exist; give 'byte', 'bpe', a tokenizer.json file, a local "
                       "Hugging Face tokenizer folder, a GGUF file or a packaged model's name")
    if path.is_file() and path.suffix not in (".json", ".gguf"):
        raise QATError(f"tokenizer: `{path}` is not a tokenizer.json file, a GGUF file or a tokenizer folder")
    return path


def load_tokenizer(path: str | os.PathLike[str]) -> FastTokenizer:
    """A saved tokenizer: a ``tokenizer.json`` file, or a folder or GGUF file loaded with
    :func:`qat.tokenizer_files.load_hf_tokenizer` (its fast backend is used, so batches encode in
    Rust); without ``transformers``, the folder's ``tokenizer.json``."""
    path = check_tokenizer_path(path)
    tk = _require_tokenizers()
    if path.is_file() and path.suffix == ".json":
        try:
            return FastTokenizer(tk.Tokenizer.from_file(str(path)), str(path))
        except Exception as e:  # the Rust loader raises plain Exception
            raise QATError(f"tokenizer: `{path}` is not a valid tokenizer.json ({e})") from e
    if path.is_dir() and importlib.util.find_spec("transformers") is None and (path / "tokenizer.json").is_file():
        return load_tokenizer(path / "tokenizer.json")
    return FastTokenizer(load_hf_tokenizer(path).backend_tokenizer, str(path))


def get_tokenizer(name: str | os.PathLike[str], train_texts: Sequence[str] = (), vocab_size: int | None = None,
                  cache_dir: str | os.PathLike[str] | None = None) -> ByteTokenizer | FastTokenizer:
    """``"byte"``, ``"bpe"`` (trained on ``train_texts`` with ``vocab_size``, default 512, cached)
    or a path for :func:`load_tokenizer`."""
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return bpe_tokenizer(train_texts, 512 if vocab_size is None else vocab_size, cache_dir)
    return load_tokenizer(name)
