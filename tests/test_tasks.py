"""Models by name and the image-classification task, end to end with QAT and export."""

from __future__ import annotations

import pytest
import torch
from lightning_models import trainer

import qat
from qat.app.data import DigitsDataModule
from qat.app.models import create_model
from qat.app.tasks import ImageClassifier
from qat.export.verify import verify_artifact
from qat.lightning import ONNXExport, QuantizationAwareTraining


@pytest.mark.parametrize(("name", "message"), [
    ("resnet18", "must be `<zoo>.<architecture>`"),
    ("torchvision.resnet999", "torchvision has no model `resnet999`"),
    ("timm.nonexistent_net", "timm has no model `nonexistent_net`"),
])
def test_unknown_models_are_named(name, message):
    with pytest.raises(qat.QATError, match=message):
        create_model(name)


def test_torchvision_constraints_are_explained():
    with pytest.raises(qat.QATError, match="3-channel"):
        create_model("torchvision.resnet18", in_chans=1)
    with pytest.raises(qat.QATError, match=r"use `timm\.resnet18`"):
        create_model("torchvision.resnet18", pretrained=True)


def test_timm_model_takes_one_channel():
    pytest.importorskip("timm")
    model = create_model("timm.resnet18", num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_image_classifier_trains_with_qat_and_exports(tmp_path):
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    module = ImageClassifier("torchvision.resnet18", num_classes=10, lr=0.02)
    data = DigitsDataModule(batch_size=32, image_size=32, channels=3)
    recipe = {"weight": {"bits": 4}, "rules": [{"names": "model.conv1", "weight": {"bits": 7}}]}
    export = ONNXExport("resnet18.onnx", rtol=0.3)
    fit = trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=2, default_root_dir=tmp_path,
                  callbacks=[QuantizationAwareTraining(recipe, schedule={"fake_quant_from": 2}, print_summary=False), export])
    fit.fit(module, datamodule=data)
    assert "val_acc" in fit.callback_metrics and 0 <= float(fit.callback_metrics["val_acc"]) <= 1
    (metrics,) = fit.test(module, datamodule=data, verbose=False)
    assert 0 <= metrics["test_acc"] <= 1
    assert verify_artifact(export.result.ort.path).ok
    assert "QLinearConv" in export.result.ort.kernels.values()


def test_bad_task_arguments_are_named():
    with pytest.raises(qat.QATError, match="optimizer must be"):
        ImageClassifier("torchvision.resnet18", optimizer="lamb")
