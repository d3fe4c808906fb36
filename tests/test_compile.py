"""torch.compile: prepared models compile with fullgraph=True and compute what eager computes;
no training step reads a tensor value on the host."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import EVERYTHING_RECIPE, TinyCNN

import qat
from qat.core.fake_quant import fake_quantize
from qat.speed.functions import fake_quantize_fixed


def _prepared(recipe=EVERYTHING_RECIPE):
    x = torch.randn(4, 3, 8, 8)
    return qat.prepare(TinyCNN(), recipe, example_inputs=x), x


def _train_steps(model, x, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outputs = []
    for _ in range(steps):
        opt.zero_grad()
        y = model(x)
        y.pow(2).mean().backward()
        opt.step()
        outputs.append(y.detach())
    return outputs


@pytest.mark.slow
def test_fullgraph_aot_eager_matches_eager_exactly():
    model, x = _prepared()
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    out_eager = _train_steps(eager, x)
    out_compiled = _train_steps(torch.compile(compiled, fullgraph=True, backend="aot_eager"), x)
    for a, b in zip(out_eager, out_compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_inductor_fake_quant_is_bit_exact_with_eager():
    """The numeric contract survives Inductor's fusion, for every layout."""

    def fq_all(x, s_tensor, s_channel, s_block, z_block):
        a = fake_quantize(x, s_tensor, torch.tensor(3.0), 0, 15)
        b = fake_quantize(x, s_channel, torch.zeros(8), -8, 7, axis=1)
        c = fake_quantize(x, s_block, z_block, -4, 3, axis=1, block_size=3)
        scale = x.abs().amax(-1, keepdim=True) / 127.5
        d = fake_quantize(x, scale, torch.zeros_like(scale), -128, 127, axis=-1, block_size=x.shape[-1])
        return a + b, c, d

    x = torch.randn(16, 8) * 3
    args = (x, torch.tensor(0.37), torch.rand(8) + 0.05, torch.rand(16, 3) + 0.05, torch.randint(-2, 2, (16, 3)).float())
    for eager, compiled in zip(fq_all(*args), torch.compile(fq_all, fullgraph=True)(*args)):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_inductor_compiles_snapshot_as_a_copy_in_its_kernels():
    """qat.core.snapshot lowers to Inductor's copy: the compiled code makes no call back into Python for
    it (a ResNet-50 step made about 200), and values and gradients are those of eager mode."""
    from torch._inductor.utils import run_and_get_code

    from qat.core.snapshot import snapshot

    def scaled(x, s):
        return x * snapshot(s * 2)

    x, s = torch.randn(6, 4, requires_grad=True), torch.rand(4) + 0.1
    out, code = run_and_get_code(torch.compile(scaled, fullgraph=True), x, s)
    assert "qat.core.snapshot" not in "\n".join(code)  # an extern call reads torch.ops.qat.snapshot.default(...)
    out.sum().backward()
    torch.testing.assert_close(out, x * (s * 2), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, (s * 2).expand(6, 4), rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_gradients_with_folded_batchnorm_match_eager():
    """Guards the workaround in qat.core.snapshot: without it, a compiled backward recomputed the
    folded weight from the already-updated running_var and the conv gradients were off by O(1)."""
    model, x = _prepared({"weight": {"bits": 4}})
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    compiled_fn = torch.compile(compiled, fullgraph=True)
    for step in range(3):
        eager.zero_grad()
        compiled.zero_grad()
        eager(x).pow(2).mean().backward()
        compiled_fn(x).pow(2).mean().backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            # gradients are ~1e-2; a conv bias followed by BatchNorm has an exactly-zero gradient (~1e-9 noise)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=f"step {step}: {name}")


@pytest.mark.slow
def test_inductor_training_with_every_feature_tracks_eager():
    """Every feature at once, three SGD steps. Compiled arithmetic differs from eager by an ulp
    here and there (Inductor's linspace in the MSE grid, BatchNorm statistics); where a value
    sits exactly on a rounding tie — a per-token row maximum always does — that can flip one
    straight-through mask entry, so the run is compared by its losses, not element by element."""
    model, x = _prepared()
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    losses_eager = [y.pow(2).mean().item() for y in _train_steps(eager, x)]
    losses_compiled = [y.pow(2).mean().item() for y in _train_steps(torch.compile(compiled, fullgraph=True), x)]
    assert losses_compiled == pytest.approx(losses_eager, rel=1e-3)
    assert losses_eager[-1] < losses_eager[0]


class _HostReadError(RuntimeError):
    pass


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Make every way Python reads a tensor's value raise (each is a GPU sync on a device)."""

    def refuse(*args, **kwargs):
        raise _HostReadError("a tensor value was read on the host during the training step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_training_step_never_reads_tensor_values_on_the_host(forbid_host_reads, monkeypatch):
    """On an accelerator; on the CPU, where reads are free, finite_range reads one flag and the
    integer codes' NaN check one sum on purpose."""
    import qat.core.observers
    import qat.speed.codes
    import qat.speed.wing

    for module in (qat.core.observers, qat.speed.codes, qat.speed.wing):  # every module that reads the flag
        monkeypatch.setattr(module, "host_reads_are_free", lambda t: False)
    model, x = _prepared()
    with pytest.raises(_HostReadError):
        bool(torch.tensor(True))  # the fixture is active
    opt = torch.optim.SGD(model.parameters(), lr=0.05, foreach=False)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.slow
def test_compile_on_torch_that_reports_exporting_under_compile(monkeypatch):
    """torch 2.7–2.13 answer ``is_exporting()`` with True under plain torch.compile
    (pytorch#176347): simulated here, compiled training must still take the training face
    (the custom op has no autograd formula), and only ``qat.exporting()`` selects the export face."""
    import qat.core.fake_quant

    monkeypatch.setattr(qat.core.fake_quant, "IS_EXPORTING_RELIABLE", False)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    torch._dynamo.reset()
    model, x = _prepared()
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    out_eager = _train_steps(eager, x, steps=2)
    out_compiled = _train_steps(torch.compile(compiled, fullgraph=True, backend="aot_eager"), x, steps=2)
    for a, b in zip(out_eager, out_compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()
    assert not qat.core.fake_quant.export_face()
    with qat.exporting():
        assert qat.core.fake_quant.export_face()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("learnable,keep_input", [(False, None), (False, False), (False, True), (True, None)])
def test_compiled_fake_quant_gradients_match_eager(dtype, learnable, keep_input):
    """Gradients of x, scale and zero point through a compiled fake-quant equal eager's. On torch
    2.11 Dynamo dropped the custom backward (all-zero gradients) when the forward's output was a
    no-op ``.to(dtype)`` or came from an in-place op; this fails there with either. ``keep_input``
    None: the core's plain function; else the speed wing's fixed-parameter one."""
    torch.manual_seed(0)
    x = torch.randn(16, 32).to(dtype).requires_grad_()
    scale = torch.full((16,), 0.1, requires_grad=learnable)
    zero_point = torch.full((16,), 3.0, requires_grad=learnable)
    inputs = (x, scale, zero_point) if learnable else (x,)

    def loss(x, scale, zero_point):
        if keep_input is None:
            y = fake_quantize(x, scale, zero_point, 0, 15, axis=0, grad_factor=0.5)
        else:
            y = fake_quantize_fixed(x, scale, zero_point, 0, 15, axis=0, keep_input=keep_input)
        return y.float().pow(2).sum()

    expected = torch.autograd.grad(loss(x, scale, zero_point), inputs)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(x, scale, zero_point), inputs)
    for e, g in zip(expected, got, strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.slow
def test_regional_compilation_keeps_every_gradient():
    """Compiling one quantized layer of a model (regional compilation, ``module.compile``) gives
    every parameter the gradient eager gives. On torch 2.11 the compiled layer's weight got a zero
    gradient while the step ran faster than float: the fast path's in-place last op."""
    model, x = _prepared(None)
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    compiled.fc1.compile(backend="aot_eager")
    grads = []
    for m in (eager, compiled):
        m(x).pow(2).mean().backward()
        grads.append({name: p.grad for name, p in m.named_parameters()})
    for name, expected in grads[0].items():
        assert expected.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], expected, rtol=0, atol=0, msg=name)
