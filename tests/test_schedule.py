"""QATSchedule: phases as a pure function of the position, and the same lifecycle in a plain
PyTorch loop — which reaches exactly the weights the Lightning callback reaches."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning_models import CNN_RECIPE, LitClassifier, trainer
from torch import nn

import qat
from qat.lightning import QuantizationAwareTraining

SCHEDULE = {"calibrate_from": 1, "fake_quant_from": 2, "freeze_bn_at": 3, "freeze_observers_at": 5}


def test_phase_table():
    s = qat.QATSchedule(calibrate_from=2, fake_quant_from=4, activation_fake_quant_from=6, learn_scales_from=5,
                        freeze_observers_at=8, freeze_bn_at=7)
    rows = [(p.name, p.observe, p.fake_quant_weights, p.fake_quant_activations, p.learn_scales, p.bn_frozen)
            for p in map(s.phase_at, [0, 2, 4, 5, 6, 7, 8])]
    assert rows == [
        ("float", False, False, False, False, False),
        ("calibration", True, False, False, False, False),
        ("qat (weights only)", True, True, False, False, False),
        ("qat (weights only)", True, True, False, True, False),
        ("qat", True, True, True, True, False),
        ("qat", True, True, True, True, True),
        ("qat (observers frozen)", False, True, True, True, True),
    ]
    assert s.phase_at(100) == s.phase_at(8)  # nothing changes after the last start


def test_defaults_and_coercion():
    default = qat.QATSchedule.coerce(None)
    assert default.phase_at(0).name == "qat" and default.learn_from == 1
    assert qat.QATSchedule.coerce({"unit": "epochs", "fake_quant_from": 2}) == qat.QATSchedule("epochs", fake_quant_from=2)
    assert qat.QATSchedule.coerce(default.to_dict()) == default
    with pytest.raises(qat.ConfigError, match="expected a mapping"):
        qat.QATSchedule.coerce([1, 2])
    with pytest.raises(qat.ConfigError, match=r"`freeze_bn_at`: `True` is not an integer"):
        qat.QATSchedule(freeze_bn_at=True)


def test_apply_sets_learnable_quantizers_apart():
    model = qat.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                        {"rules": [{"names": "2", "activation": {"learnable": True}}]})
    schedule = qat.QATSchedule(calibrate_from=0, fake_quant_from=1)
    schedule.apply(model, 0)
    assert model[2].input_quantizer.observer_enabled and not model[2].input_quantizer.fake_quant_enabled
    schedule.apply(model, 1)
    assert not model[2].input_quantizer.observer_enabled and model[0].input_quantizer.observer_enabled


def test_evaluating_turns_observers_off_and_restores_them():
    model = qat.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    model[2].input_quantizer.enable_observer(False)
    with qat.evaluating(model):
        assert not any(q.observer_enabled for _, q in qat.quantizers(model))
        model(torch.randn(3, 4))
    assert [q.observer_enabled for _, q in qat.quantizers(model)] == [True, True, True, False]
    assert not model[0].input_quantizer.calibrated  # the evaluation pass observed nothing


def plain_loop(steps: int) -> nn.Module:
    """What docs/guide/python-api.md shows for a loop without Lightning: prepare, apply the schedule before
    each step, evaluate with the observers off."""
    pl.seed_everything(0, verbose=False)
    module = LitClassifier()
    data = module.train_dataloader()
    example = next(iter(data))[0]
    model = qat.prepare(module, CNN_RECIPE, example_inputs=example)  # any nn.Module; a LightningModule here to compare
    schedule = qat.QATSchedule.coerce(SCHEDULE)
    optimizer = torch.optim.SGD(model.parameters(), lr=module.lr, momentum=0.9)
    step = 0
    while step < steps:
        for x, y in data:
            schedule.apply(model, step)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    with qat.evaluating(model):
        model.eval()(example)
    return model


def test_plain_loop_matches_the_lightning_callback_bit_for_bit():
    plain = plain_loop(steps=4)

    pl.seed_everything(0, verbose=False)
    module = LitClassifier()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=module.lr, momentum=0.9)
    trainer(max_steps=4, limit_val_batches=0,
            callbacks=[QuantizationAwareTraining(CNN_RECIPE, schedule=SCHEDULE, print_summary=False)]).fit(module)
    lightning_state = module.state_dict()
    plain_state = plain.state_dict()
    assert lightning_state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, lightning_state[key]), key
        else:
            assert value == lightning_state[key], key


def test_plain_checkpoint_round_trip(tmp_path):
    model = plain_loop(steps=3)
    path = tmp_path / "plain.pt"
    torch.save({"model": model.state_dict(), "qat": model.qat_state.to_dict()}, path)
    saved = torch.load(path, weights_only=True)
    fresh = qat.prepare(LitClassifier(), saved["qat"]["recipe"], bn_folds=saved["qat"]["bn_folds"])
    fresh.load_state_dict(saved["model"])
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
