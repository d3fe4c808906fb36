"""Quantized operands recomputed in backward (qat.set_recompute, qat.speed.recompute), or saved as
integer codes (qat.set_save_codes, the default): same gradients, less memory."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from tiny_models import EVERYTHING_RECIPE, TinyCNN
from torch import nn

import qat
from qat.modules import QuantizedLayer
from qat.speed import recompute
from qat.speed.codes import QuantizedCodes


def _saved_as_tensors():
    """Identity saved-tensor hooks: recompute_in_backward steps aside for them, so every operand is saved."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _grads(model: nn.Module, x: torch.Tensor, *, recomputed: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if recomputed:
        out = model(x)
    else:
        with _saved_as_tensors():
            out = model(x)
    (out.float() ** 2).mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


class Tokens(nn.Module):
    """Two projections read one 3-D input, as attention's q/k/v do; a transposed conv and a Conv1D follow."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.gpt2 = Conv1D(8, 16)
        self.up = nn.ConvTranspose2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x) * self.k(x)
        return self.up(self.gpt2(h).reshape(x.shape[0], 1, -1, 8)).mean()


def _prepared(case: str, fake_quant: bool) -> tuple[nn.Module, torch.Tensor]:
    """A calibrated model with frozen ranges, fake quantization on or off, in training mode."""
    torch.manual_seed(0)
    if case.startswith("cnn"):
        model, x = TinyCNN(), torch.randn(4, 3, 8, 8)
        if case == "cnn-channels-last":  # dense but not contiguous operands; the layout a later reduction follows
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        model = qat.prepare(model, EVERYTHING_RECIPE, example_inputs=x)
    else:
        model, x = Tokens(), torch.randn(2, 5, 16)
        recipe = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 8},
                  "activation": {"granularity": "per_token", "signed": True, "symmetric": True},
                  "rules": [{"types": ["ConvTranspose2d"], "weight": {"bits": 4, "granularity": "per_channel", "group_size": None},
                             "activation": {"bits": 8}}]}
        model = qat.prepare(model, recipe)
    qat.calibrate(model, [x], progress=False)
    qat.set_observers(model, False)
    qat.set_fake_quant(model, fake_quant)
    return model.train(), x


@pytest.mark.parametrize("mode", ["recompute", "codes"])
@pytest.mark.parametrize("fake_quant", [True, False], ids=["qat", "calibration"])
@pytest.mark.parametrize("case", ["cnn", "cnn-channels-last", "tokens"])
def test_gradients_are_the_same_bit_for_bit(case, fake_quant, mode, monkeypatch):
    """Recomputed operands, or operands saved as integer codes (the default), against float
    copies saved as they are (outer identity hooks turn both off)."""
    model, x = _prepared(case, fake_quant)
    x.requires_grad_()  # so that every layer's op saves both operands
    if mode == "recompute":
        qat.set_recompute(model)
    twin = copy.deepcopy(model)
    dequantized = []
    dequantize = QuantizedCodes.dequantize
    monkeypatch.setattr(QuantizedCodes, "dequantize", lambda self: dequantized.append(self.codes.dtype) or dequantize(self))
    got = _grads(model, x, recomputed=True)
    monkeypatch.undo()
    expected = _grads(twin, x.detach().clone().requires_grad_(), recomputed=False)  # x carries its per-token result
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    if mode == "codes" and fake_quant:  # every layer's weight and input, but learnable ones (LSQ), from codes
        fixed = [q for m in model.modules() if isinstance(m, QuantizedLayer)
                 for q in (m.weight_quantizer, m.input_quantizer) if q is not None and not q.spec.learnable]
        assert len(dequantized) == len(fixed) > 0 and set(dequantized) <= {torch.int8, torch.uint8}
    else:
        assert not dequantized


def _quantized_operands_alive(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The forward's output, and how many fake-quantized weights are still alive once it returned."""
    refs = []
    hook = model.fc1.weight_quantizer.register_forward_hook(lambda m, i, out: refs.append(weakref.ref(out)))
    out = model(x)
    hook.remove()
    gc.collect()
    return out, sum(r() is not None for r in refs)


def test_fake_quantized_weight_is_not_kept_for_the_backward_pass():
    torch.manual_seed(0)
    model = qat.prepare(TinyCNN(), {"weight": {"bits": 4}}, example_inputs=torch.randn(2, 3, 8, 8)).train()
    x = torch.randn(2, 3, 8, 8)
    out, alive = _quantized_operands_alive(model, x)
    assert alive == 0  # by default its one-byte codes are saved instead
    out.sum().backward()
    qat.set_save_codes(model, False)
    out, alive = _quantized_operands_alive(model, x)
    assert alive == 1  # autograd keeps it
    out.sum().backward()
    qat.set_recompute(model)
    out, alive = _quantized_operands_alive(model, x)
    assert alive == 0
    out.sum().backward()
    with _saved_as_tensors():
        out, alive = _quantized_operands_alive(model, x)
    assert alive == 1  # outer saved-tensor hooks (checkpointing) do their own job
    stripped = qat.strip(model).fc1
    assert not hasattr(stripped, "recompute_operands") and not hasattr(stripped, "save_codes")


@pytest.mark.parametrize("remade_layout", [torch.channels_last, torch.contiguous_format])
def test_a_channels_last_operand_is_remade_in_its_own_layout(remade_layout):
    """A dense, channels-last operand is recomputed rather than saved, and the backward gets it
    laid out as it was even when its function returns another layout (a copy then)."""
    from qat.speed.recompute import recompute_in_backward

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=generator).to(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, generator=generator).requires_grad_()
    w_half = (w * 0.5).to(memory_format=torch.channels_last)
    remade = []

    def remake() -> torch.Tensor:
        remade.append(True)
        return (w.detach() * 0.5).contiguous(memory_format=remade_layout)

    with recompute_in_backward({w_half: remake}):
        y = nn.functional.conv2d(x.requires_grad_(), w_half)
    y.square().sum().backward()
    assert remade == [True]
    expected_x = x.detach().clone().requires_grad_()
    nn.functional.conv2d(expected_x, (w.detach() * 0.5).to(memory_format=torch.channels_last)).square().sum().backward()
    assert torch.equal(x.grad, expected_x.grad)


def test_input_changed_in_place_before_backward_is_refused():
    torch.manual_seed(0)
    model = qat.prepare(nn.Sequential(nn.Linear(4, 4)), {"weight": {"bits": 4}}).train()
    qat.set_recompute(model)
    x = torch.randn(3, 4)
    model(x)  # calibrate the input's range
    h = x.clone().requires_grad_()
    inner = h * 1.0
    out = model(inner)
    inner.add_(1.0)  # a tensor the layer's backward needs, changed after the layer read it
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        out.sum().backward()


def test_not_active_without_autograd_or_under_outer_hooks():
    w = torch.randn(3, requires_grad=True)
    assert recompute.active(w)
    with torch.no_grad():
        assert not recompute.active(w)
    with _saved_as_tensors():
        assert not recompute.active(w)
    assert not recompute.active(torch.randn(3))


def test_layers_reading_one_input_share_its_per_token_quantization():
    spec = qat.QuantSpec(granularity="per_token", signed=True, symmetric=True)
    q, k = qat.Quantizer(spec), qat.Quantizer(spec)
    x = torch.randn(2, 5, 16, requires_grad=True)
    h = x * 1.0
    first = q(h)
    assert k(h) is first  # one fake-quantized tensor for both readers
    assert k(h.clone()) is not first
    with torch.no_grad():
        h.mul_(2.0)
    assert k(h) is not first  # changed in place: quantized again
    assert qat.Quantizer(spec.replace(bits=4))(h) is not first
    with torch.inference_mode():  # inference tensors have no version counter: nothing is shared
        x = torch.randn(2, 5, 16)
        assert torch.equal(q(x), k(x))


def _fake_quant_saved_dtypes(out: torch.Tensor) -> list[torch.dtype]:
    """Dtypes of what every fake-quantization node in ``out``'s graph saved for the backward pass."""
    dtypes, seen, todo = [], set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("FixedFakeQuantizeFunctionBackward", "FoldedFakeQuantizeFunctionBackward"):
            dtypes += [t.dtype for t in node.saved_tensors if t is not None]
        todo += [next_node for next_node, _ in node.next_functions]
    return dtypes


@pytest.mark.parametrize("model_name", ["cnn", "linear"])
def test_recomputing_layers_keep_no_straight_through_masks(model_name):
    """While recomputing, a layer keeps its float input and its weight (a parameter) anyway, so the
    fake quantization remakes its mask from them in backward rather than saving one byte per
    element; a folded weight (a new tensor) keeps its mask."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) if model_name == "cnn" else torch.randn(4, 16)
    model = TinyCNN() if model_name == "cnn" else nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model = qat.prepare(model, {"weight": {"bits": 4}}, example_inputs=x).train()
    model(x)
    saved_codes = _fake_quant_saved_dtypes(model(x.requires_grad_()))
    qat.set_save_codes(model, False)
    masks = sum(d == torch.bool for d in _fake_quant_saved_dtypes(model(x)))
    qat.set_recompute(model)
    masks_recomputing = sum(d == torch.bool for d in _fake_quant_saved_dtypes(model(x)))
    folded = 2 if model_name == "cnn" else 0  # conv1 and dw fold their BatchNorms
    quantized_tensors = 8 if model_name == "cnn" else 4  # each layer's weight and input
    assert masks == quantized_tensors and masks_recomputing == folded
    # by default the int4 weights' one-byte codes, which the layers save anyway, carry their masks
    one_byte = sorted((d for d in saved_codes if d.itemsize == 1), key=str)
    assert one_byte == [torch.bool] * (quantized_tensors // 2) + [torch.int8] * (quantized_tensors // 2)
