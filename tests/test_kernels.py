"""The fused Triton kernels give the PyTorch ops' bits. On a GPU they run on CUDA tensors; without
one, in Triton's interpreter on CPU tensors (conftest.py sets ``TRITON_INTERPRET=1``,
:func:`qat.speed.fused_kernels.on_cpu`)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_fake_quant import fq_cases
from tiny_models import EVERYTHING_RECIPE, TinyCNN, TinyResNet

import qat
from qat.core.fake_quant import broadcast_qparam
from qat.core.observers import finite_range
from qat.speed import fused_kernels
from qat.speed.functions import fake_quantize_fixed
from qat.speed.masks import fake_quantize_values, fake_quantize_with_mask

pytest.importorskip("triton")
# Triton's interpreter casts out-of-range values with numpy, which warns
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def interpreted():
    """qat.speed.fused_kernels, running on this module's DEVICE (on the CPU in Triton's interpreter)."""
    with fused_kernels.on_cpu() if DEVICE == "cpu" else contextlib.nullcontext():
        yield fused_kernels


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that -0.0 differs from 0.0."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_same_bits(fused: torch.Tensor, reference: torch.Tensor, signed_zeros: bool = True) -> None:
    """Equal bit for bit (NaN where NaN); ``signed_zeros`` False takes -0.0 and 0.0 as the same bits."""
    assert fused.dtype == reference.dtype and fused.shape == reference.shape
    nan = torch.isnan(reference)
    assert torch.equal(torch.isnan(fused), nan)
    if not signed_zeros:
        fused, reference = fused + 0, reference + 0  # -0.0 + 0 is 0.0
    assert torch.equal(_bits(fused)[~nan], _bits(reference)[~nan])


@pytest.mark.parametrize(
    "x_shape,scale_shape,expected",
    [
        ((2, 3, 4, 5), (), (1, 1)),
        ((2, 3, 4, 5), (1, 3, 1, 1), (3, 20)),  # per channel, activations
        ((6, 3, 3, 3), (6, 1, 1, 1), (6, 27)),  # per channel, conv weight
        ((8, 16, 32), (8, 16, 1), (128, 32)),  # per token
        ((8, 4, 32), (8, 4, 1), (32, 32)),  # whole blocks (x unflattened)
        ((3, 4), (4,), (4, 1)),  # scale of lower rank
        ((2, 3, 4), (2, 1, 4), None),  # two separate runs: not indexed
        ((2, 3), (2, 6), None),  # not broadcastable
    ],
)
def test_scale_layout(x_shape, scale_shape, expected):
    assert fused_kernels.scale_layout(torch.Size(x_shape), torch.Size(scale_shape)) == expected


def test_kernels_run_only_where_they_apply(interpreted):
    x, scale = torch.randn(4, 6, device=DEVICE), torch.tensor(0.1, device=DEVICE)
    assert interpreted.can_fuse(x, scale)
    assert not interpreted.can_fuse(x.t(), scale)  # not contiguous
    assert not interpreted.can_fuse(x.double(), scale)
    assert not interpreted.can_fuse(x, torch.ones(4, 6, 2))
    with interpreted.disabled():
        assert not interpreted.can_fuse(x, scale)
    with torch._subclasses.FakeTensorMode():
        assert not interpreted.can_fuse(torch.empty(4, 6, device=DEVICE), torch.tensor(0.1, device=DEVICE))


def test_cpu_tensors_use_the_pytorch_ops():
    assert not fused_kernels.can_fuse(torch.randn(4), torch.tensor(0.1))
    assert not fused_kernels.can_fuse_rows(torch.randn(2, 4))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fq_cases(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fused_fake_quantize_has_the_same_bits(interpreted, case, dtype):
    """Value, mask and straight-through gradient of the kernel equal the PyTorch ops' bit for bit:
    ties, saturation, infinities, zero and tiny scales, zero points, every layout. Up to the sign of
    a zero clamped at a range end of 0: PyTorch itself gives -0.0 there on the CPU and 0.0 on CUDA
    (``clamp(-0.0, min=0)``); the kernel keeps -0.0, as the CPU does."""
    x, scale, zero_point, qmin, qmax, axis, block = case
    x = torch.from_numpy(x).to(DEVICE, dtype)
    scale, zero_point = torch.from_numpy(scale).to(DEVICE), torch.from_numpy(zero_point).to(DEVICE)
    s = broadcast_qparam(scale, x, axis or 0, block)
    z = broadcast_qparam(zero_point, x, axis or 0, block)
    assume(interpreted.can_fuse(x, s))  # not: scales varying along two separate runs of dimensions
    for zp in (z, None):
        fused = fake_quantize_with_mask(x, s, zp, qmin, qmax)
        fused_values = fake_quantize_values(x, s, zp, qmin, qmax)
        with interpreted.disabled():
            reference = fake_quantize_with_mask(x, s, zp, qmin, qmax)
            reference_values = fake_quantize_values(x, s, zp, qmin, qmax)
        _assert_same_bits(fused[0], reference[0], signed_zeros=False)
        _assert_same_bits(fused_values, reference_values, signed_zeros=False)
        assert torch.equal(fused[1], reference[1])
    grads = []
    for enabled in (True, False):
        xt = x.clone().requires_grad_()
        with interpreted.disabled() if not enabled else contextlib.nullcontext():
            fake_quantize_fixed(xt, scale, zero_point, qmin, qmax, axis=axis or 0, block_size=block).sum().backward()
        grads.append(xt.grad)
    _assert_same_bits(*grads)


def test_fused_rounding_keeps_the_sign_of_zero_and_ties_to_even(interpreted):
    x = torch.tensor([-0.3, -0.0, 0.0, 0.5, 1.5, 2.5, -2.5, 0.49999997, 4194304.5, 8388607.5, 3e9, float("nan")], device=DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    fused = fake_quantize_with_mask(x, s, None, -(2**31), 2**31 - 1)
    with interpreted.disabled():
        reference = fake_quantize_with_mask(x, s, None, -(2**31), 2**31 - 1)
    _assert_same_bits(fused[0], reference[0])
    assert torch.equal(fused[1], reference[1])
    assert _bits(fused[0][0]) == _bits(torch.tensor(-0.0, device=DEVICE))


@pytest.mark.parametrize("shape", [(1, 70_000), (37, 129), (5, 3, 64), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_finite_range_has_the_same_values(interpreted, shape, dtype):
    """Min and max of each row's finite values, in float32; several programs per row for long rows
    (70,000 elements: five slices); NaN and ±inf ignored; a row with none gives +inf, -inf."""
    rows = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    flat = rows.view(-1, shape[-1])
    flat[0, :: max(1, shape[-1] // 7)] = float("nan")
    flat[-1, 0] = float("inf")
    flat[-1, -1] = float("-inf")
    flat[-1, shape[-1] // 2] = -1e-40  # subnormal: kept, not flushed to zero
    if flat.shape[0] > 2:
        flat[1] = float("nan")  # no finite value
    assert interpreted.can_fuse_rows(rows)
    low, high = finite_range(rows)
    with interpreted.disabled():
        expected = finite_range(rows)
    assert low.dtype == torch.float32 and low.shape == shape[:-1]
    assert torch.equal(low, expected[0]) and torch.equal(high, expected[1])


@pytest.mark.parametrize("make_model,recipe", [(TinyCNN, None), (TinyResNet, None), (TinyCNN, EVERYTHING_RECIPE)])
def test_training_steps_with_the_kernels_match_the_pytorch_ops(interpreted, make_model, recipe, monkeypatch):
    """Three SGD steps of a prepared model, kernels on and off: the same losses, observed ranges and
    weights bit for bit (BN folding, per-channel, per-group with MSE, LSQ, per-token, residuals)."""
    calls = {"fake_quantize_fused": 0, "finite_range_fused": 0}

    def counted(name):
        kernel = getattr(fused_kernels, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return kernel(*args, **kwargs)
        return call

    for name in calls:
        monkeypatch.setattr(fused_kernels, name, counted(name))
    torch.manual_seed(0)
    base = qat.prepare(make_model().to(DEVICE), recipe, torch.randn(2, 3, 8, 8, device=DEVICE))
    batches = [(torch.randn(4, 3, 8, 8, device=DEVICE), torch.randint(0, 10, (4,), device=DEVICE)) for _ in range(3)]
    runs = []
    for enabled in (True, False):
        model = copy.deepcopy(base).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        with interpreted.disabled() if not enabled else contextlib.nullcontext():
            for x, y in batches:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        runs.append((torch.stack(losses), model.state_dict()))
        if enabled:  # the kernels did run: each step, every input and weight with a fixed scale
            fixed = [q for _, q in qat.quantizers(model) if not q.spec.learnable]
            assert calls["fake_quantize_fused"] >= 3 * len(fixed) > 0, calls
            assert calls["finite_range_fused"] >= 3 * len(fixed), calls
    (fused_losses, fused_state), (reference_losses, reference_state) = runs
    assert torch.equal(fused_losses, reference_losses)
    for key, value in reference_state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            _assert_same_bits(fused_state[key], value)
