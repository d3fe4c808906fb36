"""Observers: torch.ao parity, per-channel / per-group layouts, non-finite values, percentiles,
MSE search, and all-reduced ranges across distributed ranks."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.ao.quantization.observer as ao

from qat import QuantSpec
from qat.core.fake_quant import fake_quantize
from qat.core.observers import MSE_MIN_RATIO, MSE_STEPS, both_finite, finite_range_checked, make_observer
from qat.core.qparams import qparams_from_range

AO_CASES = [
    # (our spec, torch.ao dtype, qscheme per tensor, qscheme per channel)
    (QuantSpec(bits=8, signed=False, symmetric=False), torch.quint8, torch.per_tensor_affine, torch.per_channel_affine),
    (QuantSpec(bits=8, signed=True, symmetric=True), torch.qint8, torch.per_tensor_symmetric, torch.per_channel_symmetric),
    (QuantSpec(bits=8, signed=False, symmetric=True), torch.quint8, torch.per_tensor_symmetric, torch.per_channel_symmetric),
    (QuantSpec(bits=4, signed=True, symmetric=True), torch.qint8, torch.per_tensor_symmetric, torch.per_channel_symmetric),
    (QuantSpec(bits=4, signed=True, symmetric=False), torch.qint8, torch.per_tensor_affine, torch.per_channel_affine),
    (QuantSpec(bits=3, signed=False, symmetric=False), torch.quint8, torch.per_tensor_affine, torch.per_channel_affine),
]


def _ao_range(spec: QuantSpec) -> dict:
    default = (spec.qmin, spec.qmax) in ((0, 255), (-128, 127))
    return {} if default else {"quant_min": spec.qmin, "quant_max": spec.qmax}


def _batches(n=4, shape=(16, 6, 5)):
    return [torch.randn(shape) * (i + 1) + i * 0.3 for i in range(n)]


@pytest.mark.parametrize("spec,dtype,per_tensor,_", AO_CASES)
@pytest.mark.parametrize("moving", [False, True])
def test_per_tensor_observers_match_torch_ao(spec, dtype, per_tensor, _, moving):
    kind = "moving_average_minmax" if moving else "minmax"
    spec = spec.replace(observer=kind)
    ours = make_observer(spec)
    cls = ao.MovingAverageMinMaxObserver if moving else ao.MinMaxObserver
    ref = cls(dtype=dtype, qscheme=per_tensor, **_ao_range(spec))
    for x in _batches():
        ours(x)
        ref(x)
    assert ours.min_val.item() == ref.min_val.item() and ours.max_val.item() == ref.max_val.item()
    scale, zp = ours.qparams()
    ref_scale, ref_zp = ref.calculate_qparams()
    assert scale.item() == ref_scale.item()
    assert zp.item() == ref_zp.item()


@pytest.mark.parametrize("spec,dtype,_,per_channel", AO_CASES)
@pytest.mark.parametrize("moving", [False, True])
def test_per_channel_observers_match_torch_ao(spec, dtype, _, per_channel, moving):
    kind = "moving_average_minmax" if moving else "minmax"
    spec = spec.replace(observer=kind, granularity="per_channel")
    ours = make_observer(spec, shape=(16, 6, 5), axis=1)
    cls = ao.MovingAveragePerChannelMinMaxObserver if moving else ao.PerChannelMinMaxObserver
    ref = cls(ch_axis=1, dtype=dtype, qscheme=per_channel, **_ao_range(spec))
    for x in _batches():
        ours(x)
        ref(x)
    torch.testing.assert_close(ours.min_val, ref.min_val, rtol=0, atol=0)
    torch.testing.assert_close(ours.max_val, ref.max_val, rtol=0, atol=0)
    scale, zp = ours.qparams()
    ref_scale, ref_zp = ref.calculate_qparams()
    torch.testing.assert_close(scale, ref_scale.float(), rtol=0, atol=0)
    torch.testing.assert_close(zp, ref_zp.float(), rtol=0, atol=0)


def test_per_group_ranges_match_a_loop_over_blocks_with_a_partial_last_block():
    spec = QuantSpec(bits=4, granularity="per_group", group_size=4, observer="minmax")
    x = torch.randn(3, 10, 2)
    obs = make_observer(spec, shape=x.shape, axis=1)
    obs(x)
    assert obs.min_val.shape == (3, 3, 2)
    for b, start in enumerate(range(0, 10, 4)):
        block = x[:, start : start + 4, :]
        torch.testing.assert_close(obs.min_val[:, b, :], block.amin(1), rtol=0, atol=0)
        torch.testing.assert_close(obs.max_val[:, b, :], block.amax(1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["minmax", "moving_average_minmax", "percentile"])
def test_non_finite_values_are_ignored(kind):
    spec = QuantSpec(bits=8, signed=False, symmetric=False, observer=kind, percentile=100.0)
    obs = make_observer(spec)
    clean = torch.linspace(-2, 3, 101)
    dirty = clean.clone()
    dirty[[3, 50, 77]] = torch.tensor([math.nan, math.inf, -math.inf])
    obs(dirty)
    reference = make_observer(spec)
    reference(clean[torch.isfinite(dirty)])
    assert obs.min_val.item() == reference.min_val.item() and obs.max_val.item() == reference.max_val.item()
    before = (obs.min_val.clone(), obs.max_val.clone())
    obs(torch.tensor([math.nan, math.inf, -math.inf]))  # nothing finite: range unchanged
    assert torch.equal(obs.min_val, before[0]) and torch.equal(obs.max_val, before[1])
    scale, zp = obs.qparams()
    assert torch.isfinite(scale).all() and torch.isfinite(zp).all()


def test_per_channel_group_with_no_finite_value_keeps_its_range():
    spec = QuantSpec(granularity="per_channel", observer="minmax")
    obs = make_observer(spec, shape=(3, 4), axis=0, accumulate=False)
    obs(torch.ones(3, 4))
    x = torch.full((3, 4), 2.0)
    x[1] = math.nan
    obs(x)
    assert obs.max_val.tolist() == [2.0, 1.0, 2.0]


def test_unobserved_range_gives_a_finite_scale():
    scale, zp = qparams_from_range(torch.tensor(math.inf), torch.tensor(-math.inf), QuantSpec(symmetric=False, signed=False))
    assert torch.isfinite(scale) and scale > 0 and zp.item() == 0


def test_weight_observers_follow_the_current_tensor():
    obs = make_observer(QuantSpec(observer="minmax"), accumulate=False)
    obs(torch.tensor([-5.0, 5.0]))
    obs(torch.tensor([-1.0, 2.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 2.0)


def _counting_searches(monkeypatch):
    import qat.core.observers as observers

    calls = []
    search = observers.MSEObserver._search
    monkeypatch.setattr(observers.MSEObserver, "_search", lambda self, rows: calls.append(1) or search(self, rows))
    return calls


def test_a_weight_observed_again_unchanged_is_not_searched_again(monkeypatch):
    calls = _counting_searches(monkeypatch)
    obs = make_observer(QuantSpec(bits=4, observer="mse", granularity="per_channel"), (8, 16), 0, accumulate=False)
    weight = torch.nn.Parameter(torch.randn(8, 16))
    obs(weight)
    first = (obs.min_val.clone(), obs.max_val.clone())
    obs(weight)  # calibration's next batch: the same weight
    assert len(calls) == 1 and torch.equal(obs.min_val, first[0]) and torch.equal(obs.max_val, first[1])
    with torch.no_grad():
        weight.mul_(3.0)  # an optimizer step: in place, the version moves
    obs(weight)
    assert len(calls) == 2 and torch.allclose(obs.max_val, 3 * first[1])
    obs.reset()
    obs(weight)
    assert len(calls) == 3
    obs.min_val.fill_(0.0)  # a range set from outside (a loaded state) is observed again
    obs(weight)
    assert len(calls) == 4 and torch.allclose(obs.min_val, 3 * first[0])
    other = torch.nn.Parameter(weight.detach().clone() / 3)  # another parameter, even of the same version
    obs(other)
    assert len(calls) == 5 and torch.allclose(obs.max_val, first[1])


def test_activations_and_tensors_made_anew_are_always_observed(monkeypatch):
    calls = _counting_searches(monkeypatch)
    weight = torch.nn.Parameter(torch.randn(8, 16))
    folded = make_observer(QuantSpec(bits=4, observer="mse"), accumulate=False)
    for factor in (1.0, 2.0):  # a folded weight: a new tensor each call, maybe at the same address
        folded(weight.detach() * factor)
    assert len(calls) == 2 and folded.max_val.item() > weight.max().item() * 1.2
    running = make_observer(QuantSpec(bits=8, observer="minmax"), accumulate=True)
    running(weight)
    running(weight)
    assert running.max_val.item() == weight.max().item()


def test_calibration_searches_each_weight_once(monkeypatch):
    import qat

    calls = _counting_searches(monkeypatch)
    model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
                        {"weight": {"bits": 4, "observer": "mse"}, "activation": None})
    qat.calibrate(model, [torch.randn(2, 16) for _ in range(5)])
    assert len(calls) == 2


@pytest.mark.parametrize("p", [99.0, 99.9, 90.0])
def test_percentile_observer_matches_numpy_and_averages_batches(p):
    spec = QuantSpec(bits=8, signed=False, symmetric=False, observer="percentile", percentile=p, averaging_constant=0.25)
    obs = make_observer(spec)
    batches = [torch.randn(5000) * (1 + i) for i in range(3)]
    low = high = None
    for x in batches:
        obs(x)
        lo_b, hi_b = np.percentile(x.numpy().astype(np.float64), [100 - p, p])
        low = lo_b if low is None else low + 0.25 * (lo_b - low)
        high = hi_b if high is None else high + 0.25 * (hi_b - high)
    assert obs.min_val.item() == pytest.approx(low, rel=1e-5)
    assert obs.max_val.item() == pytest.approx(high, rel=1e-5)


def test_percentile_ignores_outliers_that_minmax_keeps():
    x = torch.randn(10000)
    x[0] = 1000.0
    pct = make_observer(QuantSpec(signed=False, symmetric=False, observer="percentile", percentile=99.9))
    mm = make_observer(QuantSpec(signed=False, symmetric=False, observer="minmax"))
    pct(x)
    mm(x)
    assert mm.max_val.item() == 1000.0 and pct.max_val.item() < 5.0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_mse_observer_finds_the_best_clipping_on_its_grid(symmetric, granularity):
    torch.manual_seed(3)
    grouped = granularity == "per_group"
    spec = QuantSpec(bits=4, symmetric=symmetric, observer="mse", granularity=granularity, group_size=256 if grouped else None)
    axis = 0 if granularity == "per_channel" else 1
    w = torch.distributions.Laplace(0.0, 1.0).sample((6, 1024))
    w[:, ::256] = 15.0  # an outlier in every row and block, which min/max keeps
    obs = make_observer(spec, shape=w.shape, axis=axis, accumulate=False)
    obs(w)
    mm = make_observer(spec.replace(observer="minmax"), shape=w.shape, axis=axis, accumulate=False)
    mm(w)

    def error(low, high):
        scale, zp = qparams_from_range(low, high, spec)
        fq = fake_quantize(w, scale, zp, spec.qmin, spec.qmax, axis=axis if scale.ndim else 0, block_size=256 if grouped else 0)
        return ((fq - w) ** 2).sum().item()

    if granularity == "per_tensor":  # brute force over the same grid
        best = min(error(w.min() * r, w.max() * r) for r in torch.linspace(1.0, MSE_MIN_RATIO, MSE_STEPS))
        assert error(obs.min_val, obs.max_val) == pytest.approx(best, rel=1e-6)
    assert error(obs.min_val, obs.max_val) < 0.95 * error(mm.min_val, mm.max_val)  # ~0.84–0.88 measured


# -- distributed ---------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from qat.core.quantizer import Quantizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        spec = QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average_minmax")
        q = Quantizer(spec, role="activation")
        scales = []
        for step in range(3):
            x = torch.randn(64) * (rank + 1) + step  # different data on each rank
            q(x)
            scales.append([t.item() for t in (q.scale, q.zero_point, q.observer.min_val, q.observer.max_val)])
        gathered = [None] * world
        dist.all_gather_object(gathered, scales)
        if rank == 0:
            results.put(gathered)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_activation_ranges_are_identical_on_every_rank():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, results), nprocs=2, join=True, start_method="spawn")
    rank0, rank1 = results.get(timeout=60)
    assert rank0 == rank1  # scale, zero point and range, at every step
    # and they are the union of both ranks' data at the first step
    torch.manual_seed(0)
    x0 = torch.randn(64)
    torch.manual_seed(1)
    x1 = torch.randn(64) * 2
    assert rank0[0][2] == min(x0.min().item(), x1.min().item())
    assert rank0[0][3] == max(x0.max().item(), x1.max().item())


def test_both_finite_is_isfinite_of_both():
    values = torch.tensor([0.0, -0.0, 1.0, -3e38, 3.4e38, 1e-45, float("inf"), float("-inf"), float("nan")])
    a, b = torch.meshgrid(values, values, indexing="ij")
    assert torch.equal(both_finite(a, b), torch.isfinite(a) & torch.isfinite(b))


@pytest.mark.parametrize(("kind", "accumulate"), [("minmax", False), ("moving_average_minmax", True)])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_a_batch_seen_all_finite_skips_the_checks_with_the_same_range(kind, accumulate, granularity):
    """On the CPU the min/max observers learn on the way whether a batch is all finite
    (``all_finite``); their shortcut past the per-group checks must give the checked path's
    ranges bit for bit, and say False for a batch with a NaN or an infinity."""
    spec = QuantSpec(granularity=granularity, observer=kind)
    fast, checked = (make_observer(spec, shape=(4, 6), axis=0, accumulate=accumulate) for _ in range(2))

    def unknown(rows):  # the checked path: finiteness never known
        low, high, _ = finite_range_checked(rows)
        return low, high

    checked._checked_range = unknown
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 6, generator=generator) * scale for scale in (1.0, 3.0, 0.5)]
    batches[1][2, 3] = math.nan
    batches.insert(2, torch.full((4, 6), math.inf))
    seen = []
    for batch in batches:
        fast(batch)
        checked(batch)
        seen.append(fast.all_finite)
        assert torch.equal(fast.min_val, checked.min_val) and torch.equal(fast.max_val, checked.max_val)
        assert not checked.all_finite
    assert seen == [True, False, False, True]
