"""The speed wing's paths (qat.speed) against the plain core: the same values and gradients, bit
for bit, with less saved for the backward pass."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_fake_quant import fq_cases
from tiny_models import EVERYTHING_RECIPE, TinyCNN, TinyResNet
from torch.utils._python_dispatch import TorchDispatchMode

import qat
import qat.core
import qat.speed.functions
import qat.speed.wing
from qat import QATError, QuantSpec
from qat.core import faster
from qat.core.fake_quant import MIN_SCALE, broadcast_qparam, fake_quantize, fake_quantize_math
from qat.core.quantizer import Quantizer
from qat.speed.codes import QuantizedCodes
from qat.speed.functions import fake_quantize_fixed, fake_quantize_folded, fake_quantize_learned
from qat.speed.masks import fake_quantize_values, fake_quantize_with_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keep_input", [False, True])
def test_fixed_scale_gradient_in_each_dtype_is_the_masked_gradient(dtype, keep_input):
    """With fixed parameters, saved mask or mask made again from the input alike: the gradient
    has the input's dtype and is ``grad * mask`` exactly, a NaN gradient kept NaN in the mask too."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 32, generator=generator) * 2).to(dtype).requires_grad_()
    grad = torch.randn(16, 32, generator=generator).to(dtype)
    grad[0, :4] = float("nan")
    y = fake_quantize_fixed(x, torch.tensor(0.1), None, -8, 7, keep_input=keep_input)
    y.backward(grad)
    code = torch.round(x.detach().float() / 0.1)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, grad * ((code >= -8) & (code <= 7)), rtol=0, atol=0, equal_nan=True)



# -- the training fast path --------------------------------------------------------------------


@settings(max_examples=500)
@given(fq_cases())
def test_fast_path_gives_the_reference_value_and_straight_through_mask(case):
    x, scale, zero_point, qmin, qmax, axis, block = case
    x = torch.from_numpy(x)
    s = broadcast_qparam(torch.from_numpy(scale), x, axis or 0, block)
    z = broadcast_qparam(torch.from_numpy(zero_point), x, axis or 0, block)
    y, inside = fake_quantize_with_mask(x, s, z, qmin, qmax)
    assert torch.equal(y, fake_quantize_math(x, s, z, qmin, qmax))
    assert torch.equal(fake_quantize_values(x, s, z, qmin, qmax), y)
    code = torch.round(x / s.clamp_min(MIN_SCALE)) + z
    assert torch.equal(inside, (code >= qmin) & (code <= qmax))
    scratch = x.clone()  # overwrite: the result in the caller's temporary, the same bits
    y_over, inside_over = fake_quantize_with_mask(scratch, s, z, qmin, qmax, overwrite=True)
    assert torch.equal(y_over, y) and torch.equal(inside_over, inside)
    if not zero_point.any():  # None: the signed symmetric form, without the add and subtract
        y_none, inside_none = fake_quantize_with_mask(x, s, None, qmin, qmax)
        assert torch.equal(y_none, y) and torch.equal(inside_none, inside)
        assert torch.equal(fake_quantize_values(x, s, None, qmin, qmax), y)


@settings(max_examples=300)
@given(fq_cases(), st.sampled_from([torch.float32, torch.bfloat16]), st.booleans())
def test_learned_scales_give_the_core_value_and_gradients_bit_for_bit(case, dtype, learn_zero_point):
    """Gradient terms made in the forward pass (LSQ, LSQ+): the value and the gradients of the
    input, the scale and the zero point are the core's, bit for bit, ties, saturation, infinities
    and tiny scales included."""
    x, scale, zero_point, qmin, qmax, axis, block = case
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for function in (fake_quantize_learned, fake_quantize):
        inputs = [torch.from_numpy(x).to(dtype).requires_grad_(), torch.from_numpy(scale).requires_grad_(),
                  torch.from_numpy(zero_point).requires_grad_(learn_zero_point)]
        y = function(*inputs, qmin, qmax, axis=axis or 0, block_size=block, grad_factor=0.25)
        y.backward(grad_y)
        results.append([y.detach()] + [t.grad for t in inputs])
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("zero_point", [None, torch.tensor(3.0)])
def test_fast_path_keeps_nan_and_puts_it_outside_the_mask(zero_point):
    x = torch.tensor([float("nan"), 0.3, -float("nan"), 9.0])
    y, inside = fake_quantize_with_mask(x, torch.tensor(0.5), zero_point, -8, 7)
    reference = fake_quantize_math(x, torch.tensor(0.5), torch.tensor(0.0) if zero_point is None else zero_point, -8, 7)
    torch.testing.assert_close(y, reference, rtol=0, atol=0, equal_nan=True)
    assert inside.dtype == torch.bool and inside.tolist() == [False, True, False, False]


@settings(max_examples=300)
@given(fq_cases(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_codes_give_the_fake_quantized_value_back_bit_for_bit(case, dtype):
    x, scale, zero_point, qmin, qmax, axis, block = case
    x = torch.from_numpy(x).to(dtype).requires_grad_()
    codes = QuantizedCodes()
    y = fake_quantize_fixed(x, torch.from_numpy(scale), torch.from_numpy(zero_point), qmin, qmax,
                      axis=axis or 0, block_size=block, codes=codes)
    if qmax - qmin > 255:  # 16 bits: no byte holds the codes
        assert not codes.filled
        return
    assert codes.codes.dtype == (torch.int8 if qmax <= 127 else torch.uint8) and codes.codes.numel() == y.numel()
    assert torch.equal(codes.dequantize(), y.detach())
    assert codes.dequantize().dtype == dtype
    # where the codes carry the straight-through mask, the gradient is the one a saved mask gives
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(grad_y)
    x_mask = x.detach().clone().requires_grad_()
    fake_quantize_fixed(x_mask, torch.from_numpy(scale), torch.from_numpy(zero_point), qmin, qmax,
                  axis=axis or 0, block_size=block).backward(grad_y)
    assert torch.equal(x.grad, x_mask.grad)


def test_codes_are_not_kept_for_a_nan_or_a_learnable_scale():
    scale = torch.tensor(0.5)
    nan_codes, learnable_codes, inf_codes = QuantizedCodes(), QuantizedCodes(), QuantizedCodes()
    fake_quantize_fixed(torch.tensor([0.3, float("nan")]), scale, None, -8, 7, codes=nan_codes)
    with pytest.raises(QATError, match="fixed scale"):  # a learnable scale takes the plain path
        fake_quantize_fixed(torch.tensor([0.3, 1.0]), scale.clone().requires_grad_(), None, -8, 7, codes=learnable_codes)
    y = fake_quantize_fixed(torch.tensor([0.3, float("inf"), -float("inf")]), scale, None, -8, 7, codes=inf_codes)
    assert not nan_codes.filled and not learnable_codes.filled
    assert torch.equal(inf_codes.dequantize(), y)  # ±inf saturates: it has a code


@pytest.mark.parametrize("per_token", [False, True])
def test_codes_of_an_input_an_observer_saw_all_finite_skip_the_nan_check(per_token):
    """The weight quantizer tells the codes what its observer saw of the tensor, a per-token one
    what its tokens' range check saw; finite, they skip their NaN check (a sum over the codes),
    with a NaN they check and are not kept."""
    if per_token:
        quantizer = Quantizer(QuantSpec(bits=8, granularity="per_token"), None, "activation")
    else:
        quantizer = Quantizer(QuantSpec(bits=4, granularity="per_channel"), (8, 16), "weight")
    sums = []

    class CountSums(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.sum.default:
                sums.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for value, finite in ((0.3, True), (math.nan, False)):
        w_in = w.detach().clone()
        w_in[1, 2] = value
        codes, sums[:] = QuantizedCodes(), []
        with CountSums():
            y = quantizer(w_in.requires_grad_(), None, qat.speed.wing.OperandRequest(codes=codes))
        assert codes.input_finite is finite and codes.filled is finite
        assert (torch.Size([8, 16]) in sums) is not finite
        if finite:
            assert torch.equal(codes.dequantize(), y.detach())


def test_fixed_scale_backward_keeps_only_a_one_byte_mask():
    x = torch.randn(64, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fake_quantize_fixed(x, torch.full((64,), 0.1), None, -8, 7)
    assert [t.dtype for t in saved] == [torch.bool]
    y.backward(torch.ones_like(y))
    code = torch.round(x.detach() / 0.1)
    assert torch.equal(x.grad, ((code >= -8) & (code <= 7)).float())


@settings(max_examples=200)
@given(fq_cases())
def test_keep_input_saves_the_input_and_gives_the_same_value_and_gradient(case):
    """``keep_input`` (for callers that keep ``x`` alive anyway) remakes the mask in backward:
    the same value and straight-through gradient, bit for bit, and no mask saved."""
    x, scale, zero_point, qmin, qmax, axis, block = case
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for keep_input in (False, True):
        xt = torch.from_numpy(x).requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            y = fake_quantize_fixed(xt, torch.from_numpy(scale), torch.from_numpy(zero_point), qmin, qmax,
                              axis=axis or 0, block_size=block, keep_input=keep_input)
        y.backward(grad_y)
        results.append((y.detach(), xt.grad, sorted({t.dtype for t in saved}, key=str)))
    (y_mask, grad_mask, saved_mask), (y_kept, grad_kept, saved_kept) = results
    assert torch.equal(y_kept, y_mask) and torch.equal(grad_kept, grad_mask)
    assert saved_mask == [torch.bool] and torch.bool not in saved_kept


@pytest.mark.parametrize("codes", [False, True])
def test_folded_backward_holds_one_weight_sized_temporary_at_a_time(codes, monkeypatch):
    """The fold's backward sums the factor's product a few channels at a time beside the weight's
    gradient: its peak is one float32 weight (and a one-byte clamp of the codes the mask comes
    from), not two, which is where ResNet-18's QAT step peaked (benchmarks/RESULTS.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from overhead import LiveTensorBytes

    monkeypatch.setattr(qat.speed.functions, "SUMMED_PRODUCT_ELEMENTS", 2 * 32 * 3 * 3)  # 2 of the 64 channels at a time
    w = torch.randn(64, 32, 3, 3, requires_grad=True)
    f = (torch.rand(64, 1, 1, 1) + 0.5).requires_grad_()
    kept = QuantizedCodes() if codes else None
    y = fake_quantize_folded(w, f, (w * f).detach(), torch.full((64,), 0.05), None, -8, 7, codes=kept)
    assert codes == (kept is not None and kept.filled)
    grad_y = torch.randn_like(y)
    with LiveTensorBytes([grad_y, w]) as live:
        y.backward(grad_y)
    weight_bytes = w.numel() * w.element_size()
    assert weight_bytes <= live.peak <= weight_bytes + w.numel() + 4096


@settings(max_examples=300)
@given(fq_cases(), st.lists(st.floats(-4.0, 4.0, width=32), min_size=5, max_size=5), st.sampled_from([1, 1 << 18]))
def test_folded_node_gives_the_value_and_gradients_of_the_two_op_graph(case, factors, summed_at_a_time):
    """BatchNorm folding's one node (``fake_quantize_folded``) against ``fake_quantize_fixed(w * f)``:
    the value and the gradients of ``w`` and ``f``, bit for bit, with only the mask (or the codes
    that carry it) saved besides ``w`` and ``f``; the factor's gradient summed two channels at a
    time too (``SUMMED_PRODUCT_ELEMENTS`` 1), as a large weight's is."""
    x, scale, zero_point, qmin, qmax, axis, block = case
    assume(block == 0)
    factor_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    factor = torch.tensor(factors[: x.shape[0]]).reshape(factor_shape)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    z = None if not zero_point.any() and qmin < 0 else torch.from_numpy(zero_point)
    results = []
    codes = QuantizedCodes()
    for folded_node in (False, True):
        w, f = torch.from_numpy(x).requires_grad_(), factor.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            if folded_node:
                y = fake_quantize_folded(w, f, (w * f).detach(), torch.from_numpy(scale), z, qmin, qmax, axis=axis or 0,
                                         codes=codes)
            else:
                y = fake_quantize_fixed(w * f, torch.from_numpy(scale), z, qmin, qmax, axis=axis or 0)
        with mock.patch.object(qat.speed.functions, "SUMMED_PRODUCT_ELEMENTS", summed_at_a_time):
            y.backward(grad_y)
        results.append((y.detach(), w.grad, f.grad, saved))
    (y_two, gw_two, gf_two, _), (y_one, gw_one, gf_one, saved_one) = results
    for got, expected in ((y_one, y_two), (gw_one, gw_two), (gf_one, gf_two)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    masks = [t for t in saved_one if t.dtype == torch.bool]
    if codes.filled and QuantizedCodes.carries_mask(qmin, qmax):  # the codes are saved in the mask's place
        assert not masks and any(t is codes.codes for t in saved_one)
    else:
        assert len(masks) == 1
    if codes.filled:  # the folded weight's codes give it back too
        torch.testing.assert_close(codes.dequantize(), y_one, rtol=0, atol=0, equal_nan=True)
    else:
        assert qmax - qmin > 255 or torch.isnan(y_one).any()


@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "expanded"])
@pytest.mark.parametrize("folded", [False, True])
def test_gradients_from_codes_are_laid_out_as_from_a_saved_mask(grad_layout, folded, monkeypatch):
    """A channels-last weight whose codes carry its mask: the gradients (and the fold factor's,
    a sum whose order follows the layout, here two channels at a time) equal those of a saved
    mask bit for bit, laid out the same, whatever the incoming gradient's layout; with the two-op
    graph's for the folded node."""
    monkeypatch.setattr(qat.speed.functions, "SUMMED_PRODUCT_ELEMENTS", 1)
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 8, 3, 3, generator=generator).to(memory_format=torch.channels_last)
    f0 = torch.rand(16, 1, 1, 1, generator=generator) + 0.5
    grad = torch.randn(16, 8, 3, 3, generator=generator)
    grad = {"contiguous": grad, "channels_last": grad.to(memory_format=torch.channels_last),
            "expanded": grad[:1].expand(16, 8, 3, 3)}[grad_layout]
    scale = (w0 * f0).abs().amax((1, 2, 3)) / 7.5
    results = []
    for use_codes in (True, False):
        w, f = w0.clone().requires_grad_(), f0.clone().requires_grad_()
        codes = QuantizedCodes() if use_codes else None
        if folded and use_codes:
            y = fake_quantize_folded(w, f, (w * f).detach(), scale, None, -8, 7, codes=codes)
        elif folded:
            y = fake_quantize_fixed(w * f, scale, None, -8, 7)
        else:
            y = fake_quantize_fixed(w * f.detach(), scale, None, -8, 7, codes=codes)
        assert use_codes is (codes is not None and codes.filled)
        y.backward(grad)
        results.append((w.grad, f.grad))
    (w_codes, f_codes), (w_mask, f_mask) = results
    assert torch.equal(w_codes, w_mask) and w_codes.stride() == w_mask.stride()
    if folded:
        assert torch.equal(f_codes, f_mask)

@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (7, 5), (3, 1000), (130, 17, 1, 1), (64, 32, 3, 3, "channels_last"),
                                   (33, 7, 5, 2, "channels_last"), (130, 17, 1, 1, "channels_last")])
def test_summed_product_a_few_channels_at_a_time_is_the_plain_sum_bit_for_bit(shape, threads, monkeypatch):
    """``_summed_product`` against ``(a * b).sum_to_size``: the same bits whether the channels are
    summed 2, 3 or all at a time, with any number of threads, for contiguous and channels-last
    operands; the plain sum where the sum keeps more than the first axis or the operands are
    laid out apart."""
    *shape, layout = shape if shape[-1] == "channels_last" else (*shape, torch.contiguous_format)
    layout = torch.channels_last if layout == "channels_last" else layout
    generator = torch.Generator().manual_seed(0)
    a = (torch.randn(shape, generator=generator) * 1e3).contiguous(memory_format=layout)
    b = torch.randn(shape, generator=generator).contiguous(memory_format=layout)
    per_channel = (shape[0],) + (1,) * (len(shape) - 1)
    row = a[0].numel()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 3, shape[0]):  # 1: two channels at a time, the fewest
            monkeypatch.setattr(qat.speed.functions, "SUMMED_PRODUCT_ELEMENTS", rows * row)
            for target in (per_channel, (1,) * len(shape)):
                assert torch.equal(qat.speed.functions._summed_product(a, b, torch.Size(target)), (a * b).sum_to_size(target))
            transposed = a.transpose(0, -1).contiguous().transpose(0, -1)
            expected = (transposed * b).sum_to_size(per_channel)
            assert torch.equal(qat.speed.functions._summed_product(transposed, b, torch.Size(per_channel)), expected)
    finally:
        torch.set_num_threads(before)


# -- the selector: the speed wing against the plain core ----------------------------------------


@pytest.mark.parametrize("make_model,recipe,settings_", [
    (TinyCNN, None, {}),
    (TinyResNet, None, {"save_codes": False}),
    (TinyCNN, EVERYTHING_RECIPE, {"recompute": True}),
    (TinyResNet, None, {"weight_reuse": True}),
])
def test_training_steps_through_the_speed_wing_match_the_plain_core(make_model, recipe, settings_):
    """Three SGD steps of a prepared model with the speed wing and inside ``faster.plain()`` (the
    core's one autograd function only): the same losses, observed ranges and weights, bit for bit
    (BN folding, per-channel, per-group with MSE, LSQ, per-token, residuals; saved codes,
    recomputed operands, kept weights), and the wing took its own paths."""
    torch.manual_seed(0)
    base = qat.prepare(make_model(), recipe, torch.randn(2, 3, 8, 8))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    runs, node_names = [], []
    for plain in (False, True):
        model = copy.deepcopy(base).train()
        qat.set_save_codes(model, settings_.get("save_codes", True))
        qat.set_recompute(model, settings_.get("recompute", False))
        qat.set_weight_reuse(model, settings_.get("weight_reuse", False))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses, names = [], set()
        with faster.plain() if plain else contextlib.nullcontext():
            for x, y in batches:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                names |= _backward_node_names(loss)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        runs.append((torch.stack(losses), model.state_dict()))
        node_names.append(names)
    (fast_losses, fast_state), (plain_losses, plain_state) = runs
    assert torch.equal(fast_losses, plain_losses)
    for key, value in plain_state.items():
        if torch.is_tensor(value):
            assert torch.equal(fast_state[key], value), key
    wing_nodes = {"FixedFakeQuantizeFunctionBackward", "FoldedFakeQuantizeFunctionBackward", "_ReusedFakeQuantizeBackward",
                  "LearnedFakeQuantizeFunctionBackward"}
    assert node_names[0] & wing_nodes and not node_names[1] & wing_nodes
    assert "FakeQuantizeFunctionBackward" in node_names[1]


def _backward_node_names(loss: torch.Tensor) -> set[str]:
    names, todo, seen = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names

