"""Where a QAT training step's time goes: the kernels of a float and a QAT step, by kind.

Builds :mod:`overhead`'s workloads and variants (the same models, formats and compilation),
runs ``--steps`` steps of each under ``torch.profiler`` after a warm-up, and prints, per variant:
the wall time of a step, the time kernels kept the device busy (on CUDA; less than the wall time
when the host cannot issue work fast enough), that time split by kind of kernel (matmul and
convolution, fused elementwise and reductions from Inductor, other), and the kernels that took the
most time. It answers "which passes does QAT add" before any of them is optimized.

Run:  python benchmarks/step_profile.py --device cuda --compile regional --models resnet50 llama-large
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from overhead import Runner, variants, workload

MATMUL = re.compile(r"gemm|conv|cutlass|sm90|sm80|cudnn|xmma|wgrad|dgrad|implicit|nvjet|cublas", re.I)


def kind(name: str) -> str:
    """The kind of a kernel, from its name."""
    if MATMUL.search(name):
        return "matmul / conv"
    if name.startswith("triton_"):
        return "Inductor (Triton) " + name.split("_")[1]  # poi(ntwise), red(uction), per(sistent reduction)
    return "other"


def profile_steps(runner: Runner, steps: int, device: str) -> tuple[float, dict[str, float], list[tuple[str, float, int]]]:
    """Wall ms per step, device ms per step by kind, and the top kernels (name, ms per step, calls per step)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        runner.timed_steps(steps)
        wall = (time.perf_counter() - start) * 1000 / steps
    by_kind: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if getattr(event, "is_user_annotation", False):  # a range (Optimizer.step#AdamW.step) over kernels counted anyway
            continue
        if device == "cuda" and device_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind(event.key)] += device_us / 1000 / steps
            kernels.append((event.key, device_us / 1000 / steps, event.count // steps))
        elif device == "cpu" and event.self_cpu_time_total > 0:
            by_kind[event.key] += event.self_cpu_time_total / 1000 / steps
    kernels.sort(key=lambda k: -k[1])
    return wall, dict(by_kind), kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["resnet50", "llama-large"])
    parser.add_argument("--variants", nargs="+", default=["lightning-qat"], help="besides float")
    parser.add_argument("--compile", nargs="?", const="step", choices=["step", "regional"], default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    args = parser.parse_args(argv)
    torch._dynamo.config.recompile_limit = 64
    bf16 = args.device == "cuda"
    for name in args.models:
        work = workload(name, args.device)
        for label, prepare in variants(work, args.device).items():
            if label != "float" and label not in args.variants:
                continue
            start = time.perf_counter()
            runner = Runner(work, prepare, args.device, bf16, args.compile)
            runner.timed_steps(3)  # compilation, warm-up
            wall, by_kind, kernels = profile_steps(runner, args.steps, args.device)
            busy = sum(by_kind.values())
            print(f"\n{name}, {label} (ready after {time.perf_counter() - start:.0f} s): {wall:.1f} ms a step"
                  + (f", kernels busy {busy:.1f} ms" if args.device == "cuda" else ""))
            for what, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"  {what[:60]:<60} {ms:8.2f} ms")
            for kernel, ms, calls in kernels[: args.top]:
                print(f"    {ms:7.2f} ms {calls:4d}×  {kernel[:110]}")
            del runner
            if args.device == "cuda":
                torch.cuda.empty_cache()
            sys.stdout.flush()


if __name__ == "__main__":
    main()
