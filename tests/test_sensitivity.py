"""qat.sensitivity and qat.mixed_precision on a small CNN whose right answer is known by construction:
one convolution's weights are evenly spread (4 bits cost it little), the other's range is set by
an outlier on an input channel that is always zero, so at 4 bits every weight that matters rounds
to zero while the outlier changes nothing."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import qat
from qat.analysis.mixed_precision import layer_cost
from qat.analysis.sensitivity import other_bytes, set_weight_bits, weight_bytes
from qat.lightning import QuantizationAwareTraining

WEIGHTS_ONLY = {"weight": {"bits": 8}, "activation": None}


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same model whatever the tests before it drew
            torch.manual_seed(0)
            self.easy = nn.Conv2d(8, 8, 3, padding=1)  # the same size as `hard`: either at 8 bits costs the same
            self.hard = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.easy.weight.copy_(torch.randint(-7, 8, self.easy.weight.shape, generator=g) * 0.02)
            self.easy.weight[0] = 0.0  # output channel 0 is always 0 after the ReLU
            self.easy.bias.fill_(0.0)[0] = -1.0
            hard = torch.randn(self.hard.weight.shape, generator=g) * 0.05
            hard[:, 0, 1, 1] = 2.0  # reads the dead channel; at 4 bits the step is 2 / 7.5, the rest rounds to 0
            self.hard.weight.copy_(hard)
            self.hard.bias.zero_()
            self.head.bias.zero_()  # no constant part in the output to hide the hard layer's loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hard(torch.relu(self.easy(x)))).mean((2, 3)))


def images(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 8, 8, 8, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def table() -> qat.SensitivityTable:
    return qat.sensitivity(TwoConvs(), WEIGHTS_ONLY, images(), bits=(8, 4), progress=False)


def test_sensitivity_finds_the_fragile_layer_and_leaves_the_model_alone(table):
    assert table.layers == ["easy", "hard", "head"] and table.bits == [8, 4]
    assert table.get("easy", 4).output_sqnr_db > 20 and table.get("hard", 8).output_sqnr_db > 15
    assert table.get("hard", 4).output_sqnr_db < 5  # every weight that matters rounds to zero
    assert table.ranked(4)[0].layer == "hard"
    assert table.float_metric is None and table.get("hard", 4).loss is None
    model = TwoConvs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qat.sensitivity(model, WEIGHTS_ONLY, images(1), bits=(4,), progress=False)
    assert not qat.is_prepared(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_sizes_count_packed_codes_scales_and_everything_else(table):
    model = qat.prepare(TwoConvs(), WEIGHTS_ONLY)
    set_weight_bits(model, 4)
    qat.calibrate(model, images(1))
    # 8 × 8 × 3 × 3 weights at 4 bits = 288 bytes, plus 8 float32 scales; symmetric: no zero points
    assert weight_bytes(model.hard) == 288 + 32 == table.get("hard", 4).weight_bytes
    assert table.get("hard", 8).weight_bytes == 576 + 32
    assert other_bytes(model) == 4 * (8 + 8 + 4) == table.other_bytes  # the three biases, float
    assert table.model_bytes({"easy": 4, "hard": 4, "head": 4}) == 80 + sum(table.get(n, 4).weight_bytes for n in table.layers)


def test_search_spends_the_bytes_on_the_fragile_layer(table):
    # room for one convolution at 8 bits: the easy one and the hard one cost the same bytes
    budget = table.model_bytes({"easy": 4, "hard": 8, "head": 4})
    assert table.model_bytes({"easy": 8, "hard": 4, "head": 4}) == budget
    choice = qat.mixed_precision(table, budget)
    assert choice.bits == {"easy": 4, "hard": 8, "head": 4}
    assert choice.model_bytes <= budget and choice.objective == "output_noise"
    uniform4 = sum(layer_cost(table, layer, 4) for layer in table.layers)
    assert choice.predicted_cost < uniform4 / 10 and choice.predicted_sqnr_db > 10
    assert qat.mixed_precision(table, 10**9).bits == dict.fromkeys(table.layers, 8)  # no limit: all 8 bits
    smallest = table.model_bytes(dict.fromkeys(table.layers, 4))
    assert qat.mixed_precision(table, smallest).bits == dict.fromkeys(table.layers, 4)
    with pytest.raises(qat.QATError, match=rf"budget_bytes: {smallest - 1:,} is below the smallest model .* {smallest:,} bytes"):
        qat.mixed_precision(table, smallest - 1)


def test_the_emitted_recipe_is_accepted_by_prepare_yaml_and_the_callback(table, tmp_path):
    choice = qat.mixed_precision(table, table.model_bytes({"easy": 4, "hard": 8, "head": 4}))
    model = qat.prepare(TwoConvs(), choice.recipe)
    assert {name: model.get_submodule(name).weight_quantizer.spec.bits for name in table.layers} == choice.bits
    assert model.easy.input_quantizer is None  # the rest of the measured recipe is kept
    path = choice.save(tmp_path / "recipes" / "mixed.yaml")
    assert qat.QuantRecipe.from_yaml(path).to_dict() == qat.QuantRecipe.from_dict(choice.recipe).to_dict()
    callback = QuantizationAwareTraining(recipe=str(path))
    assert callback.recipe.specs_for("hard", model.hard)[0].bits == 8


def test_a_metric_ranks_by_its_loss_in_its_own_direction():
    def error_rate(model: nn.Module) -> float:  # lower is better: mean squared distance to the float outputs
        with torch.no_grad():
            return float(sum((model(x) - reference(x)).pow(2).mean() for x in images(2, seed=1)))

    model = TwoConvs()
    reference = copy.deepcopy(model).eval()
    table = qat.sensitivity(model, WEIGHTS_ONLY, images(), error_rate, bits=(8, 4), higher_is_better=False, progress=False)
    assert table.float_metric == 0.0
    assert table.get("hard", 4).loss > 100 * table.get("easy", 4).loss > 0 and table.get("hard", 4).loss > table.get("hard", 8).loss
    assert table.ranked(4)[0].layer == "hard"
    choice = qat.mixed_precision(table, table.model_bytes({"easy": 4, "hard": 8, "head": 4}))
    assert choice.bits["hard"] == 8 and choice.objective == "metric" and choice.predicted_sqnr_db is None
    by_noise = qat.mixed_precision(table, choice.budget_bytes, objective="output_noise")
    assert by_noise.bits["hard"] == 8 and by_noise.objective == "output_noise"
    with pytest.raises(qat.QATError, match="objective: `accuracy` is not one of auto, metric, output_noise"):
        qat.mixed_precision(table, choice.budget_bytes, objective="accuracy")


def test_metric_ties_are_broken_by_output_noise(table):
    """An evaluation set too coarse to see any loss (every loss 0) still gets the bytes spent well."""
    flat = qat.SensitivityTable([dataclasses.replace(row, metric=90.0, loss=0.0) for row in table.rows], 90.0, True,
                                table.other_bytes, table.recipe)
    choice = qat.mixed_precision(flat, table.model_bytes({"easy": 4, "hard": 8, "head": 4}))
    assert choice.objective == "metric" and choice.bits == {"easy": 4, "hard": 8, "head": 4}
    with pytest.raises(qat.QATError, match="objective: `metric` needs a table measured with `evaluate`"):
        qat.mixed_precision(table, 10**9, objective="metric")
    assert "| hard |" in table.to_markdown() and "hard" in str(table)


def test_plot_has_units_and_one_bar_per_layer_and_bit_width(table):
    ax = table.plot()
    assert ax.get_ylabel() == "model output SQNR (dB)"
    assert len(ax.patches) == len(table.layers) * len(table.bits)
    assert [t.get_text() for t in ax.get_xticklabels()] == table.layers


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": (8, 1)}, r"bits: every candidate must be an integer from 2 to 16; got \[8, 1\]"),
    ({"calibration": []}, "sensitivity got no calibration batches"),
    ({"recipe": {"weight": None, "activation": {"bits": 8}}}, "the recipe quantizes no layer's weights"),
])
def test_bad_arguments_are_named(kwargs, message):
    arguments = {"model": TwoConvs(), "recipe": WEIGHTS_ONLY, "calibration": images(1), "progress": False, **kwargs}
    with pytest.raises(qat.QATError, match=message):
        qat.sensitivity(**arguments)
    with pytest.raises(qat.QATError, match="sensitivity needs the float model"):
        qat.sensitivity(qat.prepare(TwoConvs(), WEIGHTS_ONLY), WEIGHTS_ONLY, images(1), progress=False)
