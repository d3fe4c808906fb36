"""The numeric contract: both faces of fake quantization, bit-exact with ONNX DQ(Q(x))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_oracle import onnx_fake_quant

import qat.core.fake_quant
from qat import QuantSpec
from qat.core.fake_quant import (
    MIN_SCALE,
    FakeQuantizeFunction,
    broadcast_qparam,
    fake_quantize,
    fake_quantize_op,
)

BITS = [2, 3, 4, 5, 6, 7, 8, 16]
SPECIAL_SCALES = [0.0, 1e-38, 1e-30, 1e-10, float(MIN_SCALE), float(MIN_SCALE) / 2, 2.0**-20, 2.0**-7, 0.5, 1.0, 3.0, 1e6]


@st.composite
def fq_cases(draw):
    """A random fake-quant problem: range, layout, shapes, scales, zero points and inputs with
    exact .5 ties, saturation, infinities and tiny / zero scales."""
    spec = QuantSpec(bits=draw(st.sampled_from(BITS)), signed=draw(st.booleans()), narrow_range=draw(st.booleans()))
    qmin, qmax = spec.qmin, spec.qmax
    layout = draw(st.sampled_from(["tensor", "axis", "block"]))
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))
    axis, block = None, 0
    if layout == "tensor":
        qshape: tuple[int, ...] = ()
    else:
        axis = draw(st.integers(0, rank - 1))
        if layout == "axis":
            qshape = (shape[axis],)
        else:
            shape[axis] = draw(st.integers(1, 20))
            block = draw(st.integers(1, 8))
            qshape = tuple(math.ceil(n / block) if i == axis else n for i, n in enumerate(shape))
    n_scales = int(np.prod(qshape)) if qshape else 1
    scale_values = draw(st.lists(
        st.one_of(st.sampled_from(SPECIAL_SCALES), st.floats(2.0**-13, 100.0, width=32), st.integers(-24, 4).map(lambda e: 2.0**e)),
        min_size=n_scales, max_size=n_scales))
    scale = np.array(scale_values, np.float32).reshape(qshape)
    zero_point = np.array(draw(st.lists(st.integers(qmin, qmax), min_size=n_scales, max_size=n_scales)), np.float32).reshape(qshape)
    n = int(np.prod(shape))
    span = float(qmax - qmin) * 1.5
    # inputs in code units: ties k + 0.5, arbitrary values, and far out of range
    units = draw(st.lists(st.one_of(
        st.integers(-int(span), int(span)).map(lambda k: k + 0.5),
        st.floats(-span, span),
        st.sampled_from([0.0, -0.0, 1e30, -1e30, math.inf, -math.inf]),
    ), min_size=n, max_size=n))
    units = np.array(units, np.float64).reshape(shape)
    s_b = broadcast_qparam(torch.tensor(np.maximum(scale, MIN_SCALE)), torch.empty(shape), axis or 0, block).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.where(np.isfinite(units) & (np.abs(units) < 1e29), units * s_b, units).astype(np.float32)
    return x, scale, zero_point, qmin, qmax, axis, block


def _assert_matches_onnx(got: np.ndarray, x, scale, zero_point, qmin, qmax, axis, block):
    """Equal to ReferenceEvaluator wherever |x / s| < 2**31; beyond that the reference casts
    rint(x / s) through int32 (undefined: +inf comes out as qmin), so there the spec's saturation
    is checked instead — what ONNX Runtime does (test_saturation_matches_onnxruntime)."""
    expected = onnx_fake_quant(x, scale, zero_point, qmin, qmax, axis, block)
    s_b = broadcast_qparam(torch.tensor(np.maximum(scale, MIN_SCALE)), torch.from_numpy(x), axis or 0, block).numpy()
    z_b = broadcast_qparam(torch.tensor(zero_point), torch.from_numpy(x), axis or 0, block).numpy()
    with np.errstate(over="ignore"):
        overflow = ~(np.abs(x / s_b) < 2.0**31)
    saturated = np.where(x > 0, (qmax - z_b) * s_b, (qmin - z_b) * s_b).astype(np.float32)
    np.testing.assert_array_equal(got, np.where(overflow, saturated, expected))


@settings(max_examples=2000)
@given(fq_cases())
def test_both_faces_are_bit_exact_with_onnx_reference(case):
    x, scale, zero_point, qmin, qmax, axis, block = case
    args = (torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zero_point), qmin, qmax)
    training = fake_quantize(*args, axis=axis or 0, block_size=block).numpy()
    export = fake_quantize_op(*args, axis or 0, block).numpy()
    assert not np.isnan(training).any()
    _assert_matches_onnx(training, *case)
    np.testing.assert_array_equal(export, training)


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7), (0, 15), (-32768, 32767)])
def test_saturation_matches_onnxruntime(qmin, qmax):
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnx_oracle import container

    _, _, onnx_type, _ = container(qmin, qmax)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]), helper.make_tensor("z", onnx_type, [], [qmin + 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])], initializer=inits)
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    x = np.array([1e30, -1e30, np.inf, -np.inf, 3e9, -3e9, 2.0**40, -(2.0**40)], np.float32)
    expected = session.run(None, {"x": x})[0]
    got = fake_quantize(torch.from_numpy(x), torch.tensor(0.5), torch.tensor(float(qmin + 1)), qmin, qmax).numpy()
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=400)
@given(fq_cases(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_inputs_quantize_in_float32(case, dtype):
    """bf16 / fp16: the contract is Cast(x → f32) → Q → DQ → Cast(→ dtype)."""
    x, scale, zero_point, qmin, qmax, axis, block = case
    x_low = torch.from_numpy(x).to(dtype)
    got = fake_quantize(x_low, torch.from_numpy(scale), torch.from_numpy(zero_point), qmin, qmax, axis=axis or 0, block_size=block)
    assert got.dtype == dtype
    in_fp32 = fake_quantize(x_low.float(), torch.from_numpy(scale), torch.from_numpy(zero_point), qmin, qmax,
                            axis=axis or 0, block_size=block)
    _assert_matches_onnx(in_fp32.numpy(), x_low.float().numpy(), scale, zero_point, qmin, qmax, axis, block)
    torch.testing.assert_close(got, in_fp32.to(dtype), rtol=0, atol=0)


def test_ties_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 6.5, 7.5])
    y = fake_quantize(x, torch.tensor(1.0), torch.tensor(0.0), -8, 7)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0, 6.0, 7.0]


def test_zero_and_tiny_scales_never_give_nan():
    x = torch.tensor([0.0, 1e-30, -1.0, 5.0, math.inf, -math.inf])
    for s in (0.0, 1e-45, 1e-30):
        y = fake_quantize(x, torch.tensor(s), torch.tensor(0.0), -8, 7)
        assert torch.isfinite(y).all()
        assert y[0] == 0


# -- gradients ---------------------------------------------------------------------------------


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
    x = torch.linspace(-6, 6, 97, requires_grad=True)
    fake_quantize(x, torch.tensor(0.5), torch.tensor(0.0), -8, 7).sum().backward()
    # codes round(x / 0.5) inside [-8, 7] ⇔ x in [-4.25, 3.75)
    inside = (torch.round(x.detach() / 0.5) >= -8) & (torch.round(x.detach() / 0.5) <= 7)
    assert torch.equal(x.grad, inside.float())


@pytest.mark.parametrize("bits,signed", [(4, True), (8, False), (3, True), (2, False)])
def test_lsq_gradients_match_aten_learnable_fake_quant(bits, signed):
    # Zero points are non-negative here: ATen's backward takes int64(zp + 0.5), which truncates
    # toward zero, so for a negative zero point its mask is one code off from its own forward.
    spec = QuantSpec(bits=bits, signed=signed)
    x = (torch.randn(32, 8) * 3).requires_grad_()
    # per tensor
    s, z = torch.tensor(0.31, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    fake_quantize(x, s, z, spec.qmin, spec.qmax, grad_factor=0.37).backward(torch.ones(32, 8))
    x2 = x.detach().clone().requires_grad_()
    s2, z2 = torch.tensor([0.31], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    torch._fake_quantize_learnable_per_tensor_affine(x2, s2, z2, spec.qmin, spec.qmax, 0.37).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(s.grad.reshape(1), s2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.grad.reshape(1), z2.grad, rtol=1e-5, atol=1e-5)
    # per channel along axis 1
    x.grad = None
    s = (torch.rand(8) * 0.5 + 0.05).requires_grad_()
    z = torch.randint(0, spec.qmax + 1, (8,)).float().requires_grad_()
    fake_quantize(x, s, z, spec.qmin, spec.qmax, axis=1, grad_factor=0.37).sum().backward()
    x3, s3, z3 = (t.detach().clone().requires_grad_() for t in (x, s, z))
    torch._fake_quantize_learnable_per_channel_affine(x3, s3, z3, 1, spec.qmin, spec.qmax, 0.37).sum().backward()
    torch.testing.assert_close(x.grad, x3.grad)
    torch.testing.assert_close(s.grad, s3.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.grad, z3.grad, rtol=1e-4, atol=1e-5)


def _lsq_surrogate(x, scale, zero_point, qmin, qmax, code0, residual0, inside0):
    """The function whose exact derivative LSQ defines: rounding residuals and clamp decisions
    frozen at the evaluation point, everything else differentiable."""
    inside_value = x + residual0 * scale  # (round(x/s) + z - z) * s with round(u) = u + r
    outside_value = (torch.clamp(code0, qmin, qmax) - zero_point) * scale
    return torch.where(inside0, inside_value, outside_value)


@pytest.mark.parametrize("layout", ["tensor", "channel", "block"])
def test_lsq_gradients_match_finite_differences_of_the_ste_surrogate(layout):
    torch.manual_seed(1)
    qmin, qmax = -8, 7
    x = torch.randn(6, 8, dtype=torch.float64) * 2
    axis, block = 1, 0
    if layout == "tensor":
        scale, zp = torch.tensor(0.23, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    elif layout == "channel":
        scale, zp = torch.rand(8, dtype=torch.float64) * 0.4 + 0.05, torch.randint(-2, 3, (8,)).double()
    else:
        block = 3
        scale, zp = torch.rand(6, 3, dtype=torch.float64) * 0.4 + 0.05, torch.randint(-2, 3, (6, 3)).double()
    weights = torch.randn(6, 8, dtype=torch.float64)  # a random linear functional of the output
    g = 0.5
    s_param, z_param = scale.clone().requires_grad_(), zp.clone().requires_grad_()
    (fake_quantize(x, s_param, z_param, qmin, qmax, axis=axis, block_size=block, grad_factor=g) * weights).sum().backward()

    s_b, z_b = broadcast_qparam(scale, x, axis, block), broadcast_qparam(zp, x, axis, block)
    u = x / s_b
    code0 = torch.round(u) + z_b
    inside0 = (code0 >= qmin) & (code0 <= qmax)
    residual0 = torch.round(u) - u

    def loss(s, z):
        sb, zb = broadcast_qparam(s, x, axis, block), broadcast_qparam(z, x, axis, block)
        return (_lsq_surrogate(x, sb, zb, qmin, qmax, code0, residual0, inside0) * weights).sum()

    h = 1e-6
    for param, grad in ((scale, s_param.grad), (zp, z_param.grad)):
        flat = param.reshape(-1)
        for i in range(flat.numel()):
            plus, minus = flat.clone(), flat.clone()
            plus[i] += h
            minus[i] -= h
            args_p = (plus.reshape(param.shape), zp) if param is scale else (scale, plus.reshape(param.shape))
            args_m = (minus.reshape(param.shape), zp) if param is scale else (scale, minus.reshape(param.shape))
            fd = (loss(*args_p) - loss(*args_m)) / (2 * h)
            # the op computes in float32 by contract; the surrogate here is float64
            assert grad.reshape(-1)[i].item() == pytest.approx(g * fd.item(), rel=2e-4, abs=1e-6)


def test_scale_gradient_flows_through_per_group_layout():
    w = torch.randn(4, 10)
    s = torch.full((4, 3), 0.1, requires_grad=True)
    z = torch.zeros(4, 3)
    fake_quantize(w, s, z, -8, 7, axis=1, block_size=4).pow(2).sum().backward()
    assert s.grad.shape == (4, 3) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# -- precision, autocast, compile ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_backward_in_each_dtype(dtype):
    x = (torch.randn(16, 32) * 2).to(dtype).requires_grad_()
    s = torch.tensor(0.1, requires_grad=True)
    y = fake_quantize(x, s, torch.tensor(0.0), -8, 7, grad_factor=0.1)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(s.grad)


def test_fake_quant_under_bf16_autocast():
    """torch.ao's FakeQuantize fails under bf16 autocast; ours keeps the autocast dtype."""
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)
    s = torch.tensor(0.05, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        y = fake_quantize(h, s, torch.tensor(0.0), -128, 127, grad_factor=0.01)
        loss = y.float().pow(2).mean()
    loss.backward()
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all() and torch.isfinite(s.grad)
    expected = onnx_fake_quant(h.detach().float().numpy(), np.float32(0.05), np.float32(0), -128, 127)
    torch.testing.assert_close(y.detach(), torch.from_numpy(expected).to(torch.bfloat16), rtol=0, atol=0)


def test_function_is_used_outside_export_and_custom_op_under_export():
    class M(torch.nn.Module):
        def forward(self, x):
            return fake_quantize(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7)

    def exported_ops():
        graph = torch.export.export(M(), (torch.randn(4),)).graph
        return {str(node.target) for node in graph.nodes if node.op == "call_function"}

    with qat.core.fake_quant.exporting():
        assert "qat.fake_quantize.default" in exported_ops()
    # torch.export alone selects the export face only where is_exporting() is trustworthy (≥ 2.14)
    assert ("qat.fake_quantize.default" in exported_ops()) == qat.core.fake_quant.IS_EXPORTING_RELIABLE
    assert isinstance(FakeQuantizeFunction.apply, type(torch.autograd.Function.apply))
