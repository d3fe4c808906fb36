"""Text corpora that work offline: the Python standard library's own sources, or your text files, split by document.

Every machine with Python holds a real text corpus: the standard library, about 10 MB of code,
comments and docstrings (data card: ``datasets/python_stdlib.md``). :func:`stdlib_corpus` reads it
deterministically — the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` in sorted order,
without installed packages, test suites and generated tables (:data:`EXCLUDED_DIRS`) — and caches
the result under :func:`cache_root`, keyed by the Python version and the settings.
:func:`file_corpus` does the same for ``.txt`` / ``.jsonl`` files and saved Hugging Face datasets.

Splits are made **by document** (a file, a JSON line), never inside one, so test text is never seen
in training. A document's split comes from a SHA-256 hash of its name and the seed
(:func:`split_of`), not from a permutation of the whole list: it depends on nothing else, so a
test file stays a test file when ``max_chars`` grows, when another file is added, or when Python
is upgraded and the standard library changes around it. ``max_chars`` bounds each split to its
share of the budget, filled with whole documents in a seeded order.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import platform
import re
import sys
import sysconfig
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from qat.atomic import write_atomic
from qat.errors import QATError

SPLITS = ("train", "val", "test")
FORMAT = 1
"""Version of the selection rules below; it is part of every cache key, so a change rebuilds caches."""
DEFAULT_CACHE = Path("~/.cache/lightning-qat")
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages",  # installed third-party packages, not the standard library
    "test", "tests", "idle_test",  # test suites: code written to break things, and 40 % of the bytes
    "__pycache__",
    "pydoc_data", "encodings",  # generated data: pydoc's dump of the manual, codec tables
})
"""Folder names skipped anywhere under the standard library (``lib2to3/tests``, ``ctypes/test``...)."""
SEPARATOR = "\n\n"
"""What ends every document in a split's text: one blank line between files."""


class Document(NamedTuple):
    """One unit of splitting: ``name`` is a stable key (a path relative to the source), ``text`` its content."""

    name: str
    text: str


def cache_root(path: str | os.PathLike[str] | None = None) -> Path:
    """Where corpora, tokenizers and token ids are cached: ``path``, else ``$QAT_CACHE``, else ``~/.cache/lightning-qat``."""
    return Path(path or os.environ.get("QAT_CACHE") or DEFAULT_CACHE).expanduser()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """``fractions`` as three floats (train, val, test), non-negative, summing to 1, train > 0."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or min(values) < 0 or values[0] <= 0 or abs(sum(values) - 1) > 1e-6:
        raise QATError(f"fractions must be three non-negative shares (train, val, test) with train > 0 that sum to 1; "
                       f"got `{fractions!r}`")
    return values  # type: ignore[return-value]


def _digest(name: str, seed: int) -> tuple[float, int]:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big")


def split_of(name: str, fractions: Sequence[float], seed: int = 0) -> int:
    """The split (0 train, 1 val, 2 test) of the document called ``name``: a uniform number drawn
    from SHA-256(seed, name), compared with the cumulative fractions.

    Example:
        >>> [split_of(f"file{i}.py", (0.5, 0.25, 0.25)) for i in range(8)]
        [0, 1, 2, 0, 1, 0, 1, 1]
    """
    u, _ = _digest(name, seed)
    bound = 0.0
    for index, share in enumerate(fractions):
        bound += share
        if u < bound and share > 0:
            return index
    return max(i for i, share in enumerate(fractions) if share > 0)  # u above a float sum a hair under 1


def split_documents(documents: Sequence[Document], fractions: Sequence[float], seed: int = 0,
                    max_chars: int | None = None) -> dict[str, list[Document]]:
    """Documents per split (:func:`split_of`), each split kept in the given order.

    With ``max_chars``, split ``i`` keeps at most ``fractions[i] * max_chars`` characters: whole
    documents taken in a seeded order, skipping any that would pass the budget, so a split of a
    smaller budget is (nearly always) a subset of the same split of a larger one.
    """
    fractions = check_fractions(fractions)
    parts: list[list[int]] = [[] for _ in SPLITS]
    for i, doc in enumerate(documents):
        parts[split_of(doc.name, fractions, seed)].append(i)
    if max_chars is not None:
        for part, share in zip(parts, fractions, strict=True):
            budget, used, kept = int(max_chars * share), 0, set()
            for i in sorted(part, key=lambda i: _digest(documents[i].name, seed)[1]):
                if used + len(documents[i].text) <= budget:
                    kept.add(i)
                    used += len(documents[i].text)
            part[:] = [i for i in part if i in kept]
    return {split: [documents[i] for i in part] for split, part in zip(SPLITS, parts, strict=True)}


@dataclass(frozen=True)
class TextCorpus:
    """Documents per split plus ``info``: the source, the settings and, per split, the number of
    documents, characters and the SHA-256 of :meth:`text`.

    Example::

        corpus = stdlib_corpus(max_chars=2_000_000)
        corpus.info["splits"]["train"]  # {'documents': ..., 'chars': ..., 'sha256': ...}
        print(corpus.text("val")[:200])
    """

    documents: dict[str, list[Document]]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_documents(cls, documents: dict[str, list[Document]], /, **info: Any) -> TextCorpus:
        """A corpus of ``documents`` (per split) with ``info`` completed by per-split figures."""
        corpus = cls(documents, info)
        info["splits"] = {split: {"documents": len(documents[split]), "chars": sum(len(t) for t in corpus.texts(split)),
                                  "sha256": sha256(corpus.text(split))} for split in SPLITS}
        info["chars"] = sum(s["chars"] for s in info["splits"].values())
        return corpus

    def texts(self, split: str) -> list[str]:
        """The documents of ``split``, each ending in :data:`SEPARATOR` (the pieces of :meth:`text`)."""
        return [doc.text.rstrip("\n") + SEPARATOR for doc in self.documents[split]]

    def text(self, split: str) -> str:
        """All of ``split`` as one string: its documents in order, a blank line after each."""
        return "".join(self.texts(split))

    def to_json(self) -> str:
        return json.dumps({"info": self.info, "documents": {s: [list(d) for d in docs] for s, docs in self.documents.items()}})

    @classmethod
    def from_json(cls, text: str) -> TextCorpus:
        data = json.loads(text)
        return cls({s: [Document(*d) for d in docs] for s, docs in data["documents"].items()}, data["info"])


# ---- the standard library -------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """The standard library's ``.py`` files as sorted POSIX paths relative to ``root``, without
    :data:`EXCLUDED_DIRS` (pruned while walking: ``site-packages`` may hold 100 MB)."""
    root = root or stdlib_root()
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        files += [Path(folder, n).relative_to(root).as_posix() for n in names if n.endswith(".py")]
    return sorted(files)


def _read_source(path: Path) -> str | None:
    """A Python file's text, decoded as its coding cookie says; None when unreadable (permissions, bad bytes)."""
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def stdlib_corpus(max_chars: int | None = 2_000_000, fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0,
                  cache_dir: str | os.PathLike[str] | None = None) -> TextCorpus:
    """The standard library's sources, split by file; built once, then read from the cache.

    The cache file ``corpus/stdlib-py<version>-<key>.json`` is keyed by the Python version, the
    settings, :data:`FORMAT` and every file's name and size, so an upgraded or patched standard
    library builds a new corpus instead of reusing a stale one.
    """
    fractions = check_fractions(fractions)
    root = stdlib_root()
    files = stdlib_files(root)
    settings = {"source": "stdlib", "format": FORMAT, "python": platform.python_version(),
                "implementation": sys.implementation.name, "max_chars": max_chars, "fractions": list(fractions), "seed": seed}
    listing = [(f, (root / f).stat().st_size) for f in files]
    key = sha256(json.dumps([settings, listing]))[:16]
    path = cache_root(cache_dir) / "corpus" / f"stdlib-py{settings['python']}-{key}.json"
    if path.is_file():
        try:
            return TextCorpus.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt below
    documents = [Document(f, text) for f in files if (text := _read_source(root / f)) and text.strip()]
    corpus = TextCorpus.from_documents(split_documents(documents, fractions, seed, max_chars), **settings,
                                       root=str(root), files=len(files), documents=len(documents))
    write_atomic(path, corpus.to_json(), make_parents=True)
    return corpus


# ---- Python's documentation topics ---------------------------------------------------------------


def pydoc_corpus(max_chars: int | None = None, fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0) -> TextCorpus:
    """The topics of Python's manual that ``help()`` shows (``pydoc_data.topics``: English prose with
    code), one document per topic, split by topic (``datasets/pydoc_topics.md``). Not cached: it is
    one module already in memory."""
    from pydoc_data.topics import topics

    documents = [Document(name, text) for name, text in sorted(topics.items()) if text.strip()]
    return TextCorpus.from_documents(split_documents(documents, fractions, seed, max_chars), source="pydoc", format=FORMAT,
                                     python=platform.python_version(), max_chars=max_chars,
                                     fractions=list(check_fractions(fractions)), seed=seed, documents=len(documents))


# ---- your files ----------------------------------------------------------------------------------


def source_paths(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """``source`` as a list of existing paths; a missing one is an error that names it."""
    paths = [Path(source)] if isinstance(source, str | os.PathLike) else [Path(p) for p in source]
    if not paths:
        raise QATError("source is an empty list; give 'stdlib', a .txt / .jsonl file, a folder of .txt files or a list of them")
    for path in paths:
        if not path.exists():
            raise QATError(f"source: `{path}` does not exist")
    return paths


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QATError(f"source: cannot read `{path}` as UTF-8 text ({e})") from e


def _jsonl_documents(path: Path) -> list[Document]:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise QATError(f"source: `{path}` line {number} is not JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise QATError(f"source: `{path}` line {number} has no string `text` field")
        documents.append(Document(f"{path.name}:{number}", record["text"]))
    return documents


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _saved_dataset_documents(folder: Path) -> list[Document]:
    """Rows of a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: every split, in name order)."""
    if importlib.util.find_spec("datasets") is None:
        raise QATError(f"source: `{folder}` is a Hugging Face dataset saved with save_to_disk; reading it needs the `datasets` "
                       "library: pip install datasets")
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    parts = {name: loaded[name] for name in sorted(loaded)} if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    documents = []
    for name, part in parts.items():
        if "text" not in part.column_names:
            raise QATError(f"source: the dataset `{folder}` has no `text` column (columns: {part.column_names})")
        documents += [Document(f"{name}#{i}", text) for i, text in enumerate(part["text"]) if isinstance(text, str)]
    return documents


def read_documents(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Document]:
    """Documents of ``source``: each ``.txt`` file (a folder's, recursively, in sorted order), each
    line of a ``.jsonl`` file (its ``text`` field), each row of a saved Hugging Face dataset.

    A source that is one ``.txt`` file is cut into paragraphs (blocks between blank lines), so it
    can still be split by document. Names are relative to the source, so splits do not depend on
    where the data lives.
    """
    paths = source_paths(source)
    documents: list[Document] = []
    for path in paths:
        if path.is_dir() and _is_saved_dataset(path):
            documents += _saved_dataset_documents(path)
        elif path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise QATError(f"source: the folder `{path}` holds no .txt files")
            documents += [Document(f.relative_to(path).as_posix(), _read_text(f)) for f in files]
        elif path.suffix == ".txt":
            documents.append(Document(path.name, _read_text(path)))
        elif path.suffix == ".jsonl":
            documents += _jsonl_documents(path)
        else:
            raise QATError(f"source: `{path}` is not a .txt or .jsonl file, a folder of .txt files or a saved dataset")
    if len(paths) == 1 and paths[0].suffix == ".txt" and paths[0].is_file():
        documents = [Document(f"{paths[0].name}#{i}", p) for i, p in enumerate(re.split(r"\n[ \t]*\n", documents[0].text))]
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise QATError(f"source: `{source}` holds no text (the corpus is empty)")
    return documents


def file_corpus(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], max_chars: int | None = None,
                fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0) -> TextCorpus:
    """Your text files as a :class:`TextCorpus` (not cached: they are already on disk)."""
    documents = read_documents(source)
    return TextCorpus.from_documents(split_documents(documents, fractions, seed, max_chars), source=str(source), format=FORMAT,
                                     max_chars=max_chars, fractions=list(check_fractions(fractions)), seed=seed,
                                     documents=len(documents))


def load_corpus(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = "stdlib", max_chars: int | None = 2_000_000,
                fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0,
                cache_dir: str | os.PathLike[str] | None = None) -> TextCorpus:
    """:func:`stdlib_corpus` for ``source="stdlib"``, :func:`pydoc_corpus` for ``"pydoc"``, else :func:`file_corpus`."""
    if isinstance(source, str) and source == "stdlib":
        return stdlib_corpus(max_chars, fractions, seed, cache_dir)
    if isinstance(source, str) and source == "pydoc":
        return pydoc_corpus(max_chars, fractions, seed)
    return file_corpus(source, max_chars, fractions, seed)


# ---- sentences -----------------------------------------------------------------------------------

MIN_WORDS, MAX_SENTENCE_CHARS = 4, 400
"""A docstring's first paragraph is a sentence when it has this many words and at most this many
characters: shorter ones are labels (``Return self.``), longer ones are not one thought."""


def docstring_sentences(source: str) -> list[str]:
    r"""First paragraphs of the module, class and function docstrings in ``source``, whitespace
    normalised and length-filtered, in the order they appear; [] when it does not parse.

    Example:
        >>> docstring_sentences('def f():\n    "Add two   numbers\\n    together.\\n\\n    More."')
        ['Add two numbers together.']
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    sentences = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and (doc := ast.get_docstring(node)):
            sentence = " ".join(re.split(r"\n\s*\n", doc.strip())[0].split())
            if len(sentence.split()) >= MIN_WORDS and len(sentence) <= MAX_SENTENCE_CHARS:
                sentences.append(sentence)
    return sentences


def corpus_sentences(corpus: TextCorpus, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """Docstring sentences per split of a corpus of Python files, deduplicated across the whole
    corpus: a sentence belongs to the split of the first file (in name order) that has it, so the
    same sentence is never in two splits. Cached next to the corpus (parsing 10 MB takes seconds).
    """
    key = sha256(json.dumps([FORMAT, MIN_WORDS, MAX_SENTENCE_CHARS, corpus.info["splits"]]))[:16]
    path = cache_root(cache_dir) / "sentences" / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    owner = sorted((doc.name, split, doc.text) for split in SPLITS for doc in corpus.documents[split])
    seen: set[str] = set()
    sentences: dict[str, list[str]] = {split: [] for split in SPLITS}
    for _, split, text in owner:
        for sentence in docstring_sentences(text):
            if sentence not in seen:
                seen.add(sentence)
                sentences[split].append(sentence)
    write_atomic(path, json.dumps(sentences), make_parents=True)
    return sentences


def line_sentences(path: str | os.PathLike[str], fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0) -> dict[str, list[str]]:
    """The non-empty lines of a text file as sentences (whitespace normalised, deduplicated), each
    split by a hash of its own text (:func:`split_of`), so a repeated line cannot cross splits."""
    (file,) = source_paths(path)
    if not file.is_file():
        raise QATError(f"source: `{file}` is not a text file of one sentence per line")
    fractions = check_fractions(fractions)
    lines = dict.fromkeys(" ".join(line.split()) for line in _read_text(file).splitlines())
    lines.pop("", None)
    if not lines:
        raise QATError(f"source: `{file}` holds no sentences (the corpus is empty)")
    sentences: dict[str, list[str]] = {split: [] for split in SPLITS}
    for line in lines:
        sentences[SPLITS[split_of(line, fractions, seed)]].append(line)
    return sentences
