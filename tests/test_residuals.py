"""Residual connections quantized where they are produced (recipe ``residuals: true``)."""

from __future__ import annotations

from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
from lightning_models import LitClassifier, trainer
from tiny_models import TinyResNet
from torch import nn

import qat
from qat.core.quantizer import Quantizer
from qat.errors import ConfigError, QATError
from qat.export import ort_kernels, sidecar
from qat.lightning import QuantizationAwareTraining, load_checkpoint
from qat.preparation.prepare import needs_example_inputs
from qat.preparation.residuals import OUTPUT_QUANTIZER

RECIPE = {"weight": {"bits": 4}, "rules": [{"names": "(model\\.)?stem\\.0", "weight": {"bits": 7}}], "residuals": True}
EXPECTED = {
    "block1.conv2": [],                                     # the first operand: conv2 with its folded BN
    "stem.2": ["block1.conv1"],                             # the skip operand: the stem's ReLU (called once)
    "block1": ["block2.conv1", "block2.downsample.0"],      # the sum after the block's shared ReLU
    "block2.conv2": [],
    "block2.downsample.0": [],                              # the skip operand: the downsample, BN folded
    "block2": [],                                           # the last sum; fc reads its mean
}


def _prepared(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyResNet(classes=4).eval()
    return qat.prepare(model, RECIPE, example_inputs=torch.randn(2, 3, 8, 8))


def _calibrated() -> nn.Module:
    model = _prepared()
    qat.calibrate(model, [torch.randn(16, 3, 8, 8) for _ in range(4)], progress=False)
    return model.eval()


def test_operands_and_sums_are_quantized_where_they_are_produced():
    model = _prepared()
    assert model.qat_state.residuals == EXPECTED
    modules = dict(model.named_modules())
    for name, readers in EXPECTED.items():
        assert isinstance(getattr(modules[name], OUTPUT_QUANTIZER), Quantizer), name
        for reader in readers:
            assert modules[reader].input_quantizer is None  # one quantizer per tensor: the producer's
    assert modules["block1.conv2"].input_quantizer is not None  # its input is the block's own ReLU output
    summary = qat.summary(model)
    assert "(`block1` output)" in next(r.activation for r in summary.layers if r.name == "block2.conv1")
    assert set(summary.outputs) == set(EXPECTED)


def test_a_block_computes_with_the_quantized_operands():
    """The block's sum reads the quantized skip tensor: block1(x) = relu(Q(conv2 path) + Q(x))."""
    model = _calibrated()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        stem = model.stem(x)
        skip = model.stem[2].output_quantizer.fake_quantize(model.stem[1](model.stem[0](x)).relu())
        assert torch.equal(stem, skip)
        block = model.block1
        residual = block.conv2(block.relu(block.conv1(stem)))  # conv2's output quantizer runs as its hook
        expected = block.output_quantizer.fake_quantize(torch.relu(residual + stem))
        assert torch.equal(block(stem), expected)


def test_without_the_flag_nothing_moves():
    torch.manual_seed(0)
    model = qat.prepare(TinyResNet(), {"weight": {"bits": 4}}, example_inputs=torch.randn(2, 3, 8, 8))
    assert model.qat_state.residuals == {}
    assert not any(hasattr(m, OUTPUT_QUANTIZER) for m in model.modules())
    assert "residuals" not in model.qat_state.to_dict() and "residuals" not in model.qat_state.recipe.to_dict()


def test_an_operand_no_module_returns_stays_float():
    class Inline(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.conv1(x)
            return self.conv2(h) + h.relu()  # relu inline: no module returns it; the sum is the model's own output

    model = qat.prepare(Inline(), {"residuals": True}, example_inputs=torch.randn(1, 3, 4, 4))
    assert model.qat_state.residuals == {"conv2": []}


def test_a_fresh_model_is_prepared_the_same_way_from_the_recorded_plan():
    model = _calibrated()
    saved = model.qat_state.to_dict()
    assert saved["recipe"]["residuals"] is True and saved["residuals"] == EXPECTED
    torch.manual_seed(1)
    fresh = qat.prepare(TinyResNet(classes=4), saved["recipe"], bn_folds=saved["bn_folds"], residuals=saved["residuals"])
    fresh.load_state_dict(model.state_dict())  # strict: the same quantizers under the same names
    x = torch.randn(4, 3, 8, 8)
    with qat.evaluating(model), qat.evaluating(fresh.eval()), torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    with pytest.raises(QATError, match="`block9`"):
        qat.prepare(TinyResNet(), saved["recipe"], bn_folds=saved["bn_folds"], residuals={"block9": []})


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="residuals"):
        qat.QuantRecipe.from_dict({"residuals": "yes"})
    with pytest.raises(ConfigError, match=r"residuals.*per-tensor"):
        qat.QuantRecipe.from_dict({"residuals": True, "activation": {"granularity": "per_token", "signed": True}})
    with pytest.raises(QATError, match=r"residuals: true.*example_inputs"):
        qat.prepare(TinyResNet(), {"residuals": True, "fold_bn": False})
    assert needs_example_inputs(TinyResNet(), {"residuals": True, "fold_bn": False})


def test_strip_removes_the_output_quantizers():
    model = _calibrated()
    stripped = qat.strip(model)
    assert not any(isinstance(m, Quantizer) for m in stripped.modules())
    assert not any(m._forward_hooks for m in stripped.modules())
    assert stripped(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    assert any(m._forward_hooks for m in model.modules())  # the prepared model is untouched


def test_training_stats_cover_the_output_quantizers():
    model = _prepared().train()
    with qat.ClipTracker(model) as clips:
        model(torch.randn(8, 3, 8, 8))
    stats = qat.layer_stats(model, clips)
    assert {"block1/output_min", "block1/output_scale", "block1/output_clipped", "stem.2/output_max"} <= set(stats)
    assert "block2.conv1/input_min" not in stats  # its input is `block1/output`


@pytest.mark.slow
def test_ort_runs_every_conv_and_every_addition_in_integers(tmp_path):
    model = _calibrated()
    result = qat.export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "resnet.onnx", artifacts=["ort"],
                             verification_inputs=[torch.randn(16, 3, 8, 8)], dynamic_batch=True)
    convs = [name for name in result.ort.kernels if name != "fc"]
    assert {result.ort.kernels[name] for name in convs} == {"QLinearConv"}, result.ort.kernels
    options = ort_kernels.session_options(result.ort.session_config)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(result.ort.path), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 0, ops
    qparams = sidecar.read_qparams(result.ort.qparams_path)
    assert qparams["tensors"]["block1.output_quantized"]["role"] == "activation"


class LitResNet(LitClassifier):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyResNet(classes=4)


def test_the_callback_trains_and_a_checkpoint_restores_the_output_quantizers(tmp_path):
    model = LitResNet()
    fit = trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(RECIPE, print_summary=False)], limit_val_batches=1)
    fit.fit(model)
    assert model.qat_state.residuals == {f"model.{k}": [f"model.{r}" for r in v] for k, v in EXPECTED.items()}
    path = tmp_path / "qat.ckpt"
    fit.save_checkpoint(path)
    plain = load_checkpoint(LitResNet(), path).eval()  # no example inputs: the plan comes from the checkpoint
    x = next(iter(model.val_dataloader()))[0]
    with torch.no_grad():
        assert torch.equal(plain(x), model.eval()(x))


@pytest.mark.slow
def test_four_bit_activations_around_a_seven_bit_conv_load_in_ort(tmp_path):
    """A quantized conv output in front of a 7-bit conv with uint4 input: ORT 1.32 fuses the device
    artifact's true uint4 Q/DQ into a QLinearConv that rejects uint4, unless its Q/DQ fusion is off
    (recorded in the device sidecar; the ort artifact widens the codes to uint8 instead)."""
    torch.manual_seed(0)
    recipe = {**RECIPE, "activation": {"bits": 4}}
    model = qat.prepare(TinyResNet(classes=4).eval(), recipe, example_inputs=torch.randn(2, 3, 8, 8))
    qat.calibrate(model, [torch.randn(16, 3, 8, 8) for _ in range(4)], progress=False)
    result = qat.export_onnx(model.eval(), torch.randn(2, 3, 8, 8), tmp_path / "a4.onnx", rtol=0.3)
    assert result.device.session_config == {"session.disable_quant_qdq": "1"}
    assert result.ort.session_config == {}
    for artifact in result.artifacts.values():
        assert artifact.parity.max_abs_diff < 1e-4 * artifact.parity.output_scale
        assert sidecar.read_qparams(artifact.qparams_path)["model"]["session_config"] == artifact.session_config


def test_sensitivity_quantizes_a_moved_input_at_its_producer():
    """A layer whose input quantizer moved to the producer is measured with that quantizer on,
    as its input is quantized in the model: noisier than its weights alone."""
    calibration = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    measured = {}
    for key, recipe in (("residuals", RECIPE), ("weights", {"weight": {"bits": 4}, "activation": None})):
        torch.manual_seed(0)
        measured[key] = qat.sensitivity(TinyResNet(classes=4).eval(), recipe, calibration, bits=(8,),
                                        example_inputs=calibration[0][:2], progress=False)
    for layer in ("block2.conv1", "block1.conv2"):  # input quantized at `block1`'s output / by the layer itself
        assert measured["residuals"].get(layer, 8).output_sqnr_db < measured["weights"].get(layer, 8).output_sqnr_db - 3
