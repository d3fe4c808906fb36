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


@pytest.fixture(autouse=True)
def _logging_errors_unreported(monkeypatch):
    # Lightning's log handlers still hold an earlier test's captured stream: keep logging's own
    # "--- Logging error ---" report about that out of the output under test
    monkeypatch.setattr(logging, "raiseExceptions", False)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "usage:" not in err and "Traceback" not in err and "Warning" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


def test_a_bad_override_names_the_key(capsys):
    recipe = RECIPES / "vision" / "resnet18_mnist5k_w4a8.yaml"
    assert main(["fit", "--config", str(recipe), "--trainer.max_epochz=1"]) == 2
    assert _one_error_line(capsys) == ("error: command line `--trainer.max_epochz=1`: `trainer.max_epochz`: unknown key "
                                       "(did you mean `trainer.max_epochs`?)")


@pytest.mark.parametrize(("override", "expected"), [
    ("--trainer.max_epochs=abc", "`trainer.max_epochs`: expected int or None; got `abc`"),
    ("--model.init_args.lr=fast", "`model.init_args.lr`: expected float; got `fast`"),
    ("--data.init_args.batch_size=x", "`data.init_args.batch_size`: expected int; got `x`"),
    ("--model.init_args.lr=-1", "`model.init_args.lr`: must be positive; got `-1.0`"),  # refused by the model's class
])
def test_a_bad_value_on_the_command_line_is_one_line(override, expected, tmp_path, capsys):
    recipe = RECIPES / "vision" / "resnet18_mnist5k_w4a8.yaml"
    assert main(["run", str(recipe), "--out", str(tmp_path), override]) == 2
    assert _one_error_line(capsys) == f"error: command line `{override}`: {expected}"


def test_a_bad_value_in_the_recipe_names_the_file_and_full_key(tmp_path, capsys):
    recipe = yaml.safe_load((RECIPES / "vision" / "resnet18_mnist5k_w4a8.yaml").read_text())
    recipe["trainer"]["max_epochs"] = "three"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--config", str(path)]) == 2
    assert _one_error_line(capsys) == f"error: {path}: `trainer.max_epochs`: expected int or None; got `three`"


def test_recipes_are_listed_with_their_first_line(capsys, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "recipes/vision/resnet18_mnist5k_w4a8.yaml  ResNet-18 on MNIST-5k, int4 per-channel weights" in out
    assert out.count("\n") == len(list(RECIPES.rglob("*.yaml")))


def test_recipes_listed_elsewhere_are_paths_that_exist_there(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes"]) == 0
    paths = [Path(line.split("  ")[0]) for line in capsys.readouterr().out.splitlines()]
    assert paths and all(path.is_absolute() and path.is_file() for path in paths)


def test_recipes_without_a_checkout_say_where_they_were_looked_for(tmp_path, capsys, monkeypatch):
    from qat.app import cli

    monkeypatch.setattr(cli, "recipe_folders", lambda: [tmp_path / "recipes"])
    assert main(["recipes"]) == 2
    assert capsys.readouterr().err == (f"error: no recipes folder at `{tmp_path / 'recipes'}`: the recipes ship with the source "
                                       "checkout (git clone), not the wheel; give `qat run` the path of a recipe YAML\n")


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
    ("trainr", {"max_epochs": 1}, "`trainr.max_epochs`: unknown key (did you mean `trainer.max_epochs`?)"),
    ("trainer.max_epochs", "three", "`trainer.max_epochs`: expected int or None; got `three`"),
    ("model.init_args.lr", -1, "`model.init_args.lr`: must be positive"),
    ("model.init_args.optimizer", "lamb", "`model.init_args.optimizer`: must be `sgd` or `adamw`"),
    ("model.init_args.model", "torchvision.nope", "`model.init_args`: torchvision has no model `nope`"),
    ("model.init_args.model", "resnet18", "`model.init_args.model`: `resnet18` must be `<zoo>.<architecture>`"),
    ("model.init_args.num_classes", "ten", "`model.init_args.num_classes`: expected int; got `ten`"),
    ("model.class_path", "qat.app.tasks.Nope", "`model.class_path`: `qat.app.tasks.Nope`"),
    ("data.class_path", "qat.app.data.Nope", "`data.class_path`: `qat.app.data.Nope`"),
    ("data.init_args.channels", 2, "`data.init_args.channels`: must be 1 or 3"),
    ("data.init_args.batch_size", 0, "`data.init_args.batch_size`: must be a positive integer"),
    ("data.init_args.image_size", 2, "`data.init_args.image_size`: must be an integer"),
    ("data.init_args.fractions", [0.5, 0.6], "split fractions"),
    (f"{QAT}.recipe.weight.bits", 5.5, "`trainer.callbacks[0].init_args.recipe.weight.bits`: must be one of"),
    (f"{QAT}.recipe.weight.granularity", "per_row", "granularity"),
    (f"{QAT}.recipe.wieght", {"bits": 4}, "wieght"),
    (f"{QAT}.recipe.rules.0.names", "model.(conv", "names"),
    (f"{QAT}.schedule.fake_quant_from", -1, "fake_quant_from"),
    (f"{QAT}.schedule.warmup", 3, "warmup"),
    (f"{EXPORT}.path", "model.pt", "`trainer.callbacks[1].init_args`: ONNXExport path `model.pt` must end in .onnx"),
    (f"{EXPORT}.artifacts", ["tflite"], "tflite"),
    ("trainer.callbacks.0.class_path", "qat.lightning.Nope", "`trainer.callbacks.class_path`: `qat.lightning.Nope`"),
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
def test_malformed_recipe_gives_one_clear_error(key, value, message, tmp_path, capsys):
    recipe = yaml.safe_load((RECIPES / "vision" / "resnet18_mnist5k_w4a8.yaml").read_text())
    _set(recipe, key, value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--config", str(path), "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"]) == 2
    assert message in _one_error_line(capsys)


def test_a_missing_recipe_file_is_named(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["fit", "--config", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys)
