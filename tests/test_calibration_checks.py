"""Calibration that cannot silently go wrong: untrained BatchNorm statistics and collapsed ranges are reported."""

import warnings

import pytest
import torch
from lightning_models import LitClassifier, trainer
from torch import nn

import qat
from qat.lightning import QuantizationAwareTraining


def _convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def _batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(8, 3, 8, 8) * 2 + 1 for _ in range(n)]


def test_calibrate_names_the_batchnorms_that_never_saw_training_data():
    model = qat.prepare(_convnet(), {"weight": {"bits": 4}}, example_inputs=torch.randn(2, 3, 8, 8))
    with pytest.warns(qat.CalibrationWarning, match=r"2 BatchNorm layers .*initial values.*`0\.bn`, `3\.bn`.*training mode"):
        qat.calibrate(model, _batches())


def test_calibrate_is_quiet_on_a_model_whose_statistics_were_trained():
    model = _convnet().train()
    with torch.no_grad():
        for batch in _batches():
            model(batch)
    model = qat.prepare(model, {"weight": {"bits": 4}}, example_inputs=torch.randn(2, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", qat.CalibrationWarning)
        qat.calibrate(model, _batches())
    stats = qat.layer_stats(model)
    assert set(k for k in stats if k.endswith("_clipped_at_calibration")) == {"0/input_clipped_at_calibration",
                                                                             "3/input_clipped_at_calibration",
                                                                             "7/input_clipped_at_calibration"}
    assert all(v < 0.5 for k, v in stats.items() if k.endswith("_clipped_at_calibration"))


def test_a_range_that_collapsed_on_the_last_batch_is_reported():
    # a moving average that barely moves after the first batches: the last one is 10⁴ times wider
    recipe = {"weight": {"bits": 4}, "activation": {"averaging_constant": 1e-6}}
    model = qat.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), recipe)
    batches = [torch.randn(16, 4) * 0.01, torch.randn(16, 4) * 0.01, torch.randn(64, 4) * 100]
    with pytest.warns(qat.CalibrationWarning, match=r"clip more than 50% of the last calibration batch: `0/input` \(\d+%\)"):
        qat.calibrate(model, batches)
    assert qat.layer_stats(model)["0/input_clipped_at_calibration"] > 0.5


def test_the_callback_warns_when_frozen_statistics_were_never_trained(tmp_path):
    callback = QuantizationAwareTraining({"weight": {"bits": 4}}, schedule={"freeze_bn_at": 0}, print_summary=False)
    with pytest.warns(qat.CalibrationWarning, match=r"2 BatchNorm layers normalise with statistics that still hold .*`model\.conv1\.bn`"):
        trainer(max_steps=2, callbacks=[callback], limit_val_batches=0, default_root_dir=tmp_path).fit(LitClassifier())


def test_the_callback_measures_clipping_when_its_calibration_phase_ends(tmp_path):
    callback = QuantizationAwareTraining({"weight": {"bits": 4}}, schedule={"calibrate_from": 0, "fake_quant_from": 2},
                                         print_summary=False)
    model = LitClassifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error", qat.CalibrationWarning)
        trainer(max_steps=3, callbacks=[callback], limit_val_batches=0, default_root_dir=tmp_path).fit(model)
    clipped = model.qat_state.calibration_clipped
    assert set(clipped) == {"model.conv1/input", "model.dw/input", "model.fc1/input", "model.fc2/input"}
    assert all(0 <= v < 0.5 for v in clipped.values())
