"""SmolLM2-135M: QAT with LoRA adapters against PTQ after a float LoRA fine-tune and against full QAT.

Three ways to a deployed int4 model, each trained for the same steps on the same windows of the
pydoc training split (``llm_genai.py``'s data, seeded alike), at each format of ``--formats``:

- **PTQ after float LoRA**: LoRA adapters trained in float, merged (``merge_and_unload``), then
  ``qat.prepare`` + ``qat.calibrate`` at the format: the usual way a LoRA fine-tune reaches int4;
- **QAT-LoRA**: the pretrained model with LoRA adapters, prepared and calibrated at the format,
  then the adapters (and the learnable scales) trained through the fake-quantized merged weight
  (:mod:`qat.modules.lora`); the base weights stay frozen;
- **full QAT**: every weight trained through its fake-quantized self, with learnable scales.

LoRA: rank ``--rank``, alpha twice the rank, on every projection of every layer (q, k, v, o,
gate, up, down), no dropout. AdamW: ``--lora-lr`` for the adapters, ``--lr`` for full QAT's weights
and every learnable scale. Every model is exported with ``qat.export_genai`` and its perplexity
taken through onnxruntime-genai on the held-out pydoc split and Python's ``LICENSE.txt``, in windows
of ``--window`` tokens. Trainable parameters are counted; the peak memory of one training step is
counted as ``overhead.py`` counts it on the CPU (parameters, gradients, optimizer state and what
the step allocates).

    python benchmarks/lora.py --write     # about an hour on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import datetime
import shlex
import sys
import time
from pathlib import Path

import onnxruntime_genai as og
import peft
import torch
from llm_genai import INPUT_RTOL, INT8_BLOCKS, MODEL, W4G32, W4PC, smollm2_data
from overhead import LiveTensorBytes
from results_md import cpu_description, write_block
from transformers import AutoModelForCausalLM

import qat
from qat.app.tasks.language_model import hf_model
from qat.export.genai import runtime_perplexity

FORMATS = {"W4 g32": {**W4G32, "extreme_on_grid": True}, "W4 per-channel": {**W4PC}}
"""Each format's weight spec, its rule as in llm_genai.py's extreme-on-grid PTQ rows."""
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PROJECTIONS)
    return peft.get_peft_model(model, config)


def prepared(model: torch.nn.Module, weight: dict, calibration: list[torch.Tensor], learnable: bool) -> torch.nn.Module:
    model = qat.prepare(model, {"weight": {**weight, "learnable": learnable}, "activation": INT8_BLOCKS})
    qat.calibrate(model, calibration)
    qat.set_observers(model, False)  # ranges from calibration; learnable scales train from there
    return model


def optimizer_for(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW: adapters at ``--lora-lr``, every other trainable parameter (weights, scales) at ``--lr``."""
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and (".lora_A." in n or ".lora_B." in n)]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not (".lora_A." in n or ".lora_B." in n)]
    groups = [{"params": adapters, "lr": args.lora_lr}, {"params": others, "lr": args.lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def train(model: torch.nn.Module, train_ids: list[int], args: argparse.Namespace, label: str) -> dict:
    """``args.steps`` steps on random windows (the same for every model: a fixed seed); the trainable
    parameter count and one step's peak memory, measured on the first step."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor(train_ids)
    optimizer = optimizer_for(model, args)
    model.train()
    start, figures = time.perf_counter(), {}
    figures["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=generator)
        batch = torch.stack([ids[s:s + args.seq] for s in starts.tolist()])
        if step == 0:  # parameters, their gradients and optimizer state after the step, plus the step's own peak
            state = [*model.parameters(), *model.buffers(), batch]
            with LiveTensorBytes(state) as live:
                _step(model, optimizer, batch)
            held = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                    for t in [*model.parameters(), *model.buffers(),
                              *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]}
            figures["peak_bytes"] = sum(held.values()) + live.peak
        else:
            loss = _step(model, optimizer, batch)
            if step % 10 == 0 or step == args.steps - 1:
                print(f"{label} step {step}: loss {loss:.3f}, {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    return figures


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qat-lora"), help="where the exported folders go")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5, help="full QAT's weights and every learnable scale")
    parser.add_argument("--lora-lr", type=float, default=2e-4, help="the LoRA adapters")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=5, help="windows per text")
    parser.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    gguf, texts, calibration, train_ids = smollm2_data(args.window, args.windows)
    base = hf_model(MODEL, AutoModelForCausalLM).eval()

    def perplexities(model: torch.nn.Module, folder: Path) -> dict[str, float]:
        rtol = INPUT_RTOL  # llm_genai.py's export check for int8 input blocks, and its measured cause
        print(qat.export_genai(model, folder, tokenizer=gguf, rtol=rtol), flush=True)
        return {text: runtime_perplexity(folder, chunks) for text, chunks in texts.items()}

    rows = []
    float_lora = with_lora(copy.deepcopy(base), args.rank)
    float_figures = train(float_lora, train_ids, args, "float LoRA")
    merged = float_lora.merge_and_unload()
    for fmt in args.formats:
        weight = FORMATS[fmt]
        ptq = prepared(copy.deepcopy(merged), weight, calibration, learnable=False)
        rows.append({"format": fmt, "method": "PTQ after float LoRA", **float_figures,
                     **perplexities(ptq, args.work / f"ptq-lora-{fmt.replace(' ', '-')}")})
        del ptq
        lora = prepared(with_lora(copy.deepcopy(base), args.rank), weight, calibration, learnable=True)
        figures = train(lora, train_ids, args, f"QAT-LoRA {fmt}")
        rows.append({"format": fmt, "method": "QAT-LoRA", **figures, **perplexities(lora, args.work / f"qat-lora-{fmt.replace(' ', '-')}")})
        del lora
        full = prepared(copy.deepcopy(base), weight, calibration, learnable=True)
        figures = train(full, train_ids, args, f"full QAT {fmt}")
        rows.append({"format": fmt, "method": "full QAT", **figures, **perplexities(full, args.work / f"qat-full-{fmt.replace(' ', '-')}")})
        del full

    lines = ["| format | method | trainable parameters | peak step memory (MiB) | " + " | ".join(f"{t} (genai)" for t in texts) + " |",
             "|---|---|---:|---:|" + "---:|" * len(texts)]
    for row in rows:
        lines.append(f"| {row['format']} | {row['method']} | {row['trainable'] / 1e6:.2f} M | {row['peak_bytes'] / 2**20:.0f} | "
                     + " | ".join(f"{row[t]:.2f}" for t in texts) + " |")
    lines += ["", f"{args.steps} AdamW steps of {args.batch} × {args.seq} tokens of the pydoc training split, the same windows "
              f"for every row; LoRA rank {args.rank} (alpha {2 * args.rank}) on every projection, adapters at lr {args.lora_lr}; "
              f"full QAT's weights and all learnable scales at lr {args.lr}; int8 input blocks of 32 throughout. Perplexity "
              f"through onnxruntime-genai over {args.windows} windows of {args.window} tokens per text. Command: "
              f"`python benchmarks/lora.py {shlex.join(argv if argv is not None else sys.argv[1:])}`; {cpu_description()}; "
              f"onnxruntime-genai {og.__version__}, peft {peft.__version__}, torch {torch.__version__.split('+')[0]}; "
              f"{datetime.date.today()}."]
    print("\n".join(lines))
    if args.write:
        write_block("lora", lines)


if __name__ == "__main__":
    main()
