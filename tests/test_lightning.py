"""The QuantizationAwareTraining callback: preparation, schedule, evaluation, logging, lifecycle,
errors — each on a tiny CNN and a tiny Hugging Face Llama."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning_models import MODELS, LitClassifier, MemoryLogger, quantizer_state, trainer
from torch import nn

import qat
from qat.lightning import QuantizationAwareTraining, load_checkpoint
from qat.modules import QuantConvNd, QuantizedLayer
from qat.speed import allocator

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")


def build(kind: str, **schedule) -> tuple[pl.LightningModule, QuantizationAwareTraining]:
    module_cls, recipe = MODELS[kind]
    torch.manual_seed(0)
    return module_cls(), QuantizationAwareTraining(recipe, schedule=schedule or None, print_summary=False)


both = pytest.mark.parametrize("kind", ["cnn", "llama"])


class Recorder(Callback):
    """Records the quantizer switches at each training batch (after the QAT callback ran) and
    during evaluation."""

    def __init__(self) -> None:
        self.train: list[tuple[bool, bool, bool, bool]] = []
        self.evaluation: list[bool] = []

    @staticmethod
    def switches(module: nn.Module) -> tuple[bool, bool, bool, bool]:
        qs = [q for _, q in qat.quantizers(module) if not q.spec.dynamic and not q.spec.learnable]
        weights = [q for q in qs if q.role == "weight"]
        acts = [q for _, q in qat.quantizers(module) if q.role == "activation"]
        bn = [m.bn_frozen for m in module.modules() if isinstance(m, QuantConvNd) and m.bn is not None]
        return (any(q.observer_enabled for q in qs), any(q.fake_quant_enabled for q in weights),
                any(q.fake_quant_enabled for q in acts), any(bn))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(self.switches(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.evaluation.append(any(q.observer_enabled for _, q in qat.quantizers(pl_module)))

    on_test_batch_start = on_predict_batch_start = on_validation_batch_start


# -- preparation ---------------------------------------------------------------------------------------


class OptimizerSpy(Callback):
    def on_fit_start(self, trainer, pl_module):
        self.optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.model_params = {id(p) for p in pl_module.parameters()}
        self.learnable = [q.scale for _, q in qat.quantizers(pl_module) if q.spec.learnable]


@both
def test_prepared_before_the_optimizer_is_built(kind):
    model, callback = build(kind, fake_quant_from=1)
    spy = OptimizerSpy()
    trainer(max_steps=1, callbacks=[callback, spy], limit_val_batches=0).fit(model)
    assert any(isinstance(m, QuantizedLayer) for m in model.modules())
    assert spy.optimizer_params == spy.model_params  # the optimizer holds exactly the trained parameters
    assert all(id(p) in spy.optimizer_params for p in spy.learnable)
    if kind == "cnn":
        assert spy.learnable and isinstance(model.model.bn1, nn.Identity)  # folded, found from the first batch


# -- schedule ------------------------------------------------------------------------------------------


@both
def test_schedule_in_steps_sets_every_phase(kind):
    model, callback = build(kind, calibrate_from=1, fake_quant_from=2, activation_fake_quant_from=3, freeze_bn_at=4,
                            freeze_observers_at=5)
    recorder, logger = Recorder(), MemoryLogger()
    trainer(max_steps=6, callbacks=[callback, recorder], logger=logger, log_every_n_steps=100, limit_val_batches=0).fit(model)
    # (observe, fake-quant weights, fake-quant activations, BN frozen)
    expected = [(False, False, False, False), (True, False, False, False), (True, True, False, False),
                (True, True, True, False), (True, True, True, True), (False, True, True, True)]
    if kind == "llama":  # dynamic activations observe nothing; no BatchNorm
        expected = [(o, w, a, False) for o, w, a, _ in expected]
    assert recorder.train == expected
    assert list(dict.fromkeys(value for _, value in logger.history["qat/phase"])) == [0, 1, 2, 3]


@both
def test_schedule_in_epochs(kind):
    model, callback = build(kind, unit="epochs", calibrate_from=0, fake_quant_from=1, freeze_observers_at=2)
    recorder = Recorder()
    trainer(max_epochs=3, limit_train_batches=2, callbacks=[callback, recorder], limit_val_batches=0).fit(model)
    observe, fq = [r[0] for r in recorder.train], [r[1] for r in recorder.train]
    assert fq == [False, False, True, True, True, True]
    assert observe == [True, True, True, True, False, False]


def test_learnable_scales_stop_observing_when_learning_starts():
    model, callback = build("cnn", calibrate_from=0, fake_quant_from=2)
    trainer(max_steps=4, callbacks=[callback], limit_val_batches=0).fit(model)
    q = model.model.fc2.input_quantizer
    assert q.spec.learnable and not q.observer_enabled and q.fake_quant_enabled
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0  # LSQ gradient reached the scale


# -- evaluation ----------------------------------------------------------------------------------------


@both
def test_observers_are_off_during_validation_test_and_predict(kind):
    model, callback = build(kind)
    recorder = Recorder()
    fit = trainer(max_steps=2, callbacks=[callback, recorder], limit_val_batches=1, val_check_interval=1)
    fit.fit(model)
    before = quantizer_state(model)
    fit.validate(model)
    fit.test(model)
    fit.predict(model)
    assert recorder.evaluation and not any(recorder.evaluation)
    after = quantizer_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # evaluation moved no range
    assert Recorder.switches(model)[0]  # observers restored for training


def test_validate_without_calibration_is_refused():
    model, callback = build("cnn")
    with pytest.raises(qat.QATError, match=r"never calibrated.*ckpt_path"):
        trainer(callbacks=[callback]).validate(model)


# -- logging -------------------------------------------------------------------------------------------


@both
def test_per_layer_statistics_are_logged_at_the_interval(kind, capsys):
    model, callback = build(kind)
    callback.print_summary = True
    logger = MemoryLogger()
    trainer(max_steps=5, callbacks=[callback], logger=logger, log_every_n_steps=2, limit_val_batches=0).fit(model)
    layer = "model.fc1" if kind == "cnn" else "model.model.layers.0.self_attn.q_proj"
    for metric in ("weight_scale", "weight_sqnr_db", "weight_clipped"):
        steps = [step for step, _ in logger.history[f"qat/{layer}/{metric}"]]
        assert steps == [0, 2, 4]
    sqnr = [v for _, v in logger.history[f"qat/{layer}/weight_sqnr_db"]]
    assert all(5 < v < 40 for v in sqnr)  # int4
    if kind == "cnn":
        low, high = logger.history["qat/model.fc1/input_min"][-1][1], logger.history["qat/model.fc1/input_max"][-1][1]
        assert low == 0 and high > 0  # after a ReLU
        clipped = [v for _, v in logger.history["qat/model.fc1/input_clipped"]]
        assert all(0 <= v < 0.2 for v in clipped)
    out = capsys.readouterr().out
    assert out.count("Quantized layers") == 2  # fit start and fit end


# -- lifecycle -----------------------------------------------------------------------------------------


@both
def test_fit_twice_then_validate_test_predict_with_other_callbacks(kind, tmp_path):
    model, callback = build(kind)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last=True)
    logger = MemoryLogger()
    others = [checkpoint, EarlyStopping("val_loss", patience=5), LearningRateMonitor("step")]
    first = trainer(max_epochs=2, callbacks=[callback, *others], logger=logger, enable_checkpointing=True, limit_val_batches=1,
                    log_every_n_steps=1)
    first.fit(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]
    second = trainer(max_epochs=1, callbacks=[callback], logger=False, limit_val_batches=1)
    second.fit(model)  # prepared once: the same layers, no double wrapping
    assert [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)] == layers
    assert not any(isinstance(m.weight_quantizer, QuantizedLayer) for m in model.modules() if isinstance(m, QuantizedLayer))
    assert second.validate(model)[0]["val_loss"] > 0
    assert second.test(model)[0]["test_loss"] > 0
    assert len(second.predict(model)) > 0
    assert "lr-SGD" in logger.history or "lr-AdamW" in logger.history
    assert checkpoint.best_model_path and checkpoint.last_model_path


@both
def test_checkpoint_loads_into_a_fresh_model(kind, tmp_path):
    model, callback = build(kind, calibrate_from=0, fake_quant_from=1)
    fit = trainer(max_epochs=2, callbacks=[callback], limit_val_batches=1)
    fit.fit(model)
    path = tmp_path / "qat.ckpt"
    fit.save_checkpoint(path)
    expected = fit.validate(model)[0]["val_loss"]

    fresh, fresh_callback = build(kind, calibrate_from=0, fake_quant_from=1)
    got = trainer(callbacks=[fresh_callback], limit_val_batches=1).validate(fresh, ckpt_path=path)[0]["val_loss"]
    assert got == expected
    assert trainer(callbacks=[fresh_callback]).test(fresh, ckpt_path=path)[0]["test_loss"] > 0
    assert len(trainer(callbacks=[fresh_callback]).predict(fresh, ckpt_path=path)) > 0

    plain = load_checkpoint(MODELS[kind][0](), path).eval()  # no Trainer
    model.eval()
    batch = next(iter(model.val_dataloader()))
    with torch.no_grad():
        if kind == "cnn":
            assert torch.equal(plain(batch[0]), model(batch[0]))
        else:
            assert torch.equal(plain(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(qat.QATError, match="does not exist"):
        load_checkpoint(LitClassifier(), tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "weights.ckpt")
    with pytest.raises(qat.QATError, match="carries no QAT recipe"):
        load_checkpoint(LitClassifier(), tmp_path / "weights.ckpt")


# -- precision and compile -----------------------------------------------------------------------------


@both
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precision(kind, precision):
    model, callback = build(kind)
    trainer(max_steps=3, callbacks=[callback], precision=precision, limit_val_batches=1, val_check_interval=3).fit(model)
    states = quantizer_state(model)
    assert states and all(v.dtype == torch.float32 for k, v in states.items() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in states.values() if v.is_floating_point())
    assert all(q.calibrated for _, q in qat.quantizers(model))


class ReuseSpy(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        weights = [q for _, q in qat.quantizers(pl_module) if q.role == "weight"]
        self.reusing = all(q.reuse_unchanged for q in weights)
        self.kept = sum(qat.speed.wing.is_kept(q) for q in weights)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_weights_are_fake_quantized_once_per_optimizer_step_with_gradient_accumulation(accumulate):
    model, callback = build("llama")
    spy = ReuseSpy()
    trainer(max_steps=2, callbacks=[callback, spy], limit_val_batches=0, accumulate_grad_batches=accumulate).fit(model)
    assert spy.reusing == (accumulate > 1) and (spy.kept > 0) == (accumulate > 1)
    assert not any(q.reuse_unchanged or qat.speed.wing.is_kept(q) for _, q in qat.quantizers(model))  # freed after fit


@pytest.mark.parametrize("retain", [True, False, None])
def test_freed_memory_is_retained_on_the_cpu_only_when_asked(retain, monkeypatch):
    """Opt-in: by default (None) the callback leaves the process allocator as it is."""
    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append("retain") or True)
    model, _ = build("cnn")
    options = {} if retain is None else {"retain_freed_memory": retain}
    callback = QuantizationAwareTraining(MODELS["cnn"][1], print_summary=False, **options)
    trainer(max_steps=1, callbacks=[callback], limit_val_batches=0).fit(model)
    assert calls == (["retain"] if retain else [])


@pytest.mark.slow
@both
def test_compiled_model(kind):
    model, callback = build(kind)
    logger = MemoryLogger()
    backend = "aot_eager" if kind == "cnn" else "eager"  # the Llama: Dynamo capture only, to keep the test short
    torch._dynamo.reset()
    trainer(max_steps=2, callbacks=[callback], logger=logger, log_every_n_steps=1, limit_val_batches=0).fit(
        torch.compile(model, backend=backend))
    assert all(q.calibrated for _, q in qat.quantizers(model))
    losses = [v for _, v in logger.history["train_loss"]] if "train_loss" in logger.history else []
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not any(k.endswith("input_clipped") for k in logger.history)  # hooks would force recompiles
    assert any(k.endswith("weight_sqnr_db") for k in logger.history)


# -- errors --------------------------------------------------------------------------------------------


@both
def test_recipe_matching_no_layer_fails_at_setup(kind):
    callback = QuantizationAwareTraining({"rules": [{"names": "model.nope", "weight": {"bits": 4}}]})
    with pytest.raises(qat.QATError, match=r"rules\[0\].*matches no layer"):
        trainer(max_steps=1, callbacks=[callback]).fit(MODELS[kind][0]())


@both
def test_callback_added_twice_fails_at_setup(kind):
    with pytest.raises(qat.QATError, match="added to the Trainer 2 times"):
        trainer(max_steps=1, callbacks=[QuantizationAwareTraining(), QuantizationAwareTraining()]).fit(MODELS[kind][0]())


@both
def test_model_prepared_with_another_recipe_fails_at_setup(kind):
    model, callback = build(kind)
    qat.prepare(model, {"weight": {"bits": 8}}, example_inputs=torch.randn(2, 3, 8, 8) if kind == "cnn" else None)
    with pytest.raises(qat.QATError, match="already prepared with another recipe"):
        trainer(max_steps=1, callbacks=[callback]).fit(model)


@both
def test_model_prepared_with_the_same_recipe_is_adopted(kind):
    model, callback = build(kind)
    qat.prepare(model, MODELS[kind][1], example_inputs=torch.randn(2, 3, 8, 8) if kind == "cnn" else None)
    trainer(max_steps=2, callbacks=[callback], limit_val_batches=0).fit(model)
    assert all(q.calibrated for _, q in qat.quantizers(model))


@pytest.mark.parametrize(("schedule", "message"), [
    ({"calibrate_from": 5, "fake_quant_from": 2}, r"`schedule.fake_quant_from`: 2 is out of order.*calibrate_from"),
    ({"freeze_observers_at": 0}, r"`schedule.freeze_observers_at`: 0 is out of order"),
    ({"fake_quant_from": 3, "learn_scales_from": 1}, r"`schedule.learn_scales_from`: 1 is out of order"),
    ({"calibrate_from": 2, "fake_quant_from": 2, "learn_scales_from": 2}, r"`schedule.learn_scales_from`: 2 .*after `calibrate_from`"),
    ({"unit": "batches"}, r"`schedule.unit`: `batches` is not a unit; allowed: steps, epochs"),
    ({"fake_quant_from": -1}, r"`schedule.fake_quant_from`: `-1` is not an integer ≥ 0"),
    ({"freeze_bn": 3}, r"`schedule.freeze_bn`: unknown key \(did you mean `freeze_bn_at`\?\)"),
])
def test_schedule_errors(schedule, message):
    with pytest.raises(qat.ConfigError, match=message):
        QuantizationAwareTraining(schedule=schedule)


def test_learnable_scales_observe_one_step_before_learning_by_default():
    model, callback = build("cnn")  # QAT from step 0: the learnable scale observes step 0, learns from step 1
    q_flags = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            q_flags.append(pl_module.model.fc2.input_quantizer.observer_enabled)

    trainer(max_steps=3, callbacks=[callback, Spy()], limit_val_batches=0).fit(model)
    assert q_flags == [True, False, False]


def test_fsdp1_is_refused_and_fsdp2_is_not_but_exports_at_fit_end_point_to_the_checkpoint():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from qat.lightning.export_callback import refuse_sharding
    from qat.lightning.quantization_aware_training import check_strategy

    with pytest.raises(qat.QATError, match=r"does not support FSDPStrategy.*ModelParallelStrategy\(data_parallel_size=N.*'ddp'"):
        check_strategy(FSDPStrategy())
    check_strategy(ModelParallelStrategy())
    with pytest.raises(qat.QATError, match=r"GenaiFolderExport cannot export a model sharded.*qat export --checkpoint"):
        refuse_sharding(SimpleNamespace(strategy=ModelParallelStrategy()), "GenaiFolderExport")
