"""Does regional compilation keep a QAT model's gradients? One step of ``overhead.py``'s small Llama,
eager against ``--compile regional`` (each decoder layer ``torch.compile``d), same weights and batch:
the loss and every parameter's gradient compared. A compiled step that drops the gradient of the
layers it compiles is faster and lighter than a float step, which is how a wrong benchmark row looks.

Run:  python benchmarks/regional_grads.py [--device cuda] [--bf16] [--backend inductor]
"""

from __future__ import annotations

import argparse
import copy

import overhead
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--variant", default="lightning-qat", choices=["float", "lightning-qat"])
    args = parser.parse_args()
    work = overhead.workload("llama", args.device)
    base = copy.deepcopy(work.model)
    if args.variant == "lightning-qat":
        base = overhead._ours(work)(base)
    base = base.to(args.device).train()
    batch = tuple(t.to(args.device) for t in work.batch)
    results = {}
    for mode in ("eager", "regional"):
        model = copy.deepcopy(base)
        if mode == "regional":
            overhead.compile_blocks(model, backend=args.backend)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = work.loss(model, batch)
        loss.backward()
        results[mode] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    (eager_loss, eager), (compiled_loss, compiled) = results["eager"], results["regional"]
    missing = [n for n, g in eager.items() if g is not None and (compiled[n] is None or not compiled[n].any())]
    worst = max((((eager[n] - compiled[n]).abs().max() / eager[n].abs().max().clamp_min(1e-30)).item(), n)
                for n in eager if eager[n] is not None and compiled[n] is not None)
    print(f"torch {torch.__version__}, {args.device}, bf16={args.bf16}, {args.backend}, {args.variant}: "
          f"loss eager {eager_loss:.6f} regional {compiled_loss:.6f}; "
          f"{len(missing)} of {len(eager)} gradients missing or zero in the compiled step {missing[:4]}; "
          f"largest relative gradient difference {worst[0]:.2e} ({worst[1]})")


if __name__ == "__main__":
    main()
