"""SmolLM2-135M through onnxruntime-genai: post-training formats and decode speed, ours against the genai model builder's.

Every model is measured in the deployed artifact, through onnxruntime-genai (perplexity from the
runtime's own logits), and in PyTorch where one exists:

- float: the de-quantized SmolLM2 (its weights came from Q4_1; ``datasets/smollm2_135m_instruct.md``),
  exported with ``qat.export_genai`` unquantized (plain MatMuls);
- the builder's int4 at its default (symmetric round-to-nearest, the best pure-int4 setting) and
  at ``algo_config=k_quant_mixed`` (some layers and the head in int8), built here from the same folder;
- our PTQ: ``qat.prepare`` + ``qat.calibrate`` + ``qat.export_genai``, W4 g32 on every projection,
  the head and the tied embedding, input in int8 blocks of 32 (MatMulNBits' int8 path, as the
  builder's), in several weight rules: symmetric ``amax / 7.5`` (min/max), ONNX Runtime's
  ``extreme_on_grid`` (min/max and MSE), and uint4 with integer zero points (min/max); W4 per
  channel, the harder format (its scales do not line up with the Q4_1 blocks the weights came
  from); and mixed precision, int8 where the builder's ``k_quant_mixed`` puts int8;
- with ``--qat-steps``: the float model fine-tuned for those steps (the fair baseline) and QAT at
  the formats of ``--qat-formats``, each from its format's best PTQ (the lowest held-out
  perplexity through the runtime), trained on the text's next tokens; for the formats of
  ``--distill`` also by distillation from the float model, and for those of ``--fixed-scales``
  also with the calibrated scales kept (only the weights train). Each QAT row also gives its
  trained weights' perplexity with fake quantization off, which splits its gap to the fine-tuned
  float into what training did to the weights and what the rounding still costs.

Texts: the held-out split of Python's documentation topics (``TextDataModule(source="pydoc")``'s
test split) and, out of domain, Python's ``LICENSE.txt``, in windows of ``--window`` tokens.
Generation: for every model with a PyTorch twin, the first tokens of a few held-out windows continued
greedily through onnxruntime-genai and in PyTorch (:func:`qat.export.genai.check_generation`).
Speed: batch 1, one process, runs alternating, median of ``--repeats``: decode tokens/s for 128
new tokens after a 16-token prompt, and the prefill time of a ``--window``-token prompt.

    python benchmarks/llm_genai.py --write                  # PTQ and speed: about 40 minutes on 2 CPU cores
    python benchmarks/llm_genai.py --qat-steps 150 --write  # and fine-tuning: 4-6 s a step per model on 2 CPU cores

Rows are kept in ``--work`` as they are measured; a run that stops resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
import torch
from results_md import cpu_description, write_block
from transformers import AutoModelForCausalLM

import qat
from qat.app.data.corpus import pydoc_corpus
from qat.app.data.tokenizer import load_tokenizer
from qat.app.models import resolve_model
from qat.app.tasks.language_model import hf_model, save_hf_folder
from qat.export.genai import DEFAULT_RTOL, check_generation, runtime_greedy, runtime_perplexity
from qat.export.parity import perplexity

MODEL = "smollm2-135m-instruct"
W4G32 = {"bits": 4, "granularity": "per_group", "group_size": 32}
W4PC = {"bits": 4, "granularity": "per_channel", "extreme_on_grid": True}
INT8_BLOCKS = {"bits": 8, "signed": True, "symmetric": True, "narrow_range": True, "granularity": "per_token", "group_size": 32}
MIXED_LAYERS = [i for i in range(30) if i < 30 / 8 or i >= 7 * 30 / 8 or (i - round(30 / 8)) % 3 == 2]
"""The layers whose q/k/v and down projections the builder's ``k_quant_mixed`` keeps in int8 (llama.cpp's choice)."""
MIXED_RULES = [{"names": r"lm_head|model\.embed_tokens", "weight": {"bits": 8}},
               {"names": rf"model\.layers\.({'|'.join(map(str, MIXED_LAYERS))})\.(self_attn\.[qkv]_proj|mlp\.down_proj)",
                "weight": {"bits": 8}}]
OURS = {  # key: (row name, format, weight spec, rules)
    "g32": ("ours PTQ, symmetric amax/7.5, min/max", "W4 g32", {**W4G32}, []),
    "g32-eog": ("ours PTQ, extreme on grid, min/max", "W4 g32", {**W4G32, "extreme_on_grid": True}, []),
    "g32-eog-mse": ("ours PTQ, extreme on grid, MSE", "W4 g32", {**W4G32, "extreme_on_grid": True, "observer": "mse"}, []),
    "g32-uint4": ("ours PTQ, uint4 zero points, min/max", "W4 g32 uint4", {**W4G32, "signed": False, "symmetric": False}, []),
    "pc-eog": ("ours PTQ W4 per-channel, extreme on grid, min/max", "W4 per-channel", {**W4PC}, []),
    "pc-eog-mse": ("ours PTQ W4 per-channel, extreme on grid, MSE", "W4 per-channel", {**W4PC, "observer": "mse"}, []),
    "mixed-eog": ("ours PTQ mixed (k_quant_mixed's int8 layers), extreme on grid, min/max", "mixed", {**W4G32, "extreme_on_grid": True},
                  MIXED_RULES),
    "mixed-eog-mse": ("ours PTQ mixed (k_quant_mixed's int8 layers), extreme on grid, MSE", "mixed",
                      {**W4G32, "extreme_on_grid": True, "observer": "mse"}, MIXED_RULES),
    "mixed-uint4": ("ours PTQ mixed (k_quant_mixed's int8 layers), uint4 zero points, min/max", "mixed uint4",
                    {**W4G32, "signed": False, "symmetric": False}, MIXED_RULES),
}
"""Our PTQ rows. A format with zero points (uint4: ``k_quant``'s, as the builder's ``k_quant_mixed``
stores them) is a format of its own: QAT starts from the best PTQ of the same format."""
FORMATS = sorted({fmt for _, fmt, _, _ in OURS.values()})
QAT_VARIANTS = {  # variant: (what its row's name says, its format's suffix)
    "labels": ("learnable scales", ""),
    "distill": ("learnable scales, distilled from the float model", ", distilled"),
    "fixed": ("scales fixed from calibration", ", scales fixed"),
}
"""QAT's variants: next-token loss on the text with learned scales (``--qat-formats``), distillation
from the float model (``--distill``), and the text's loss with the calibrated scales kept
(``--fixed-scales``)."""
INPUT_RTOL = 0.15
"""The export's check for models with int8 input blocks (see ``export`` in :func:`main` for the measured cause)."""
PROMPTS, PROMPT_TOKENS, GENERATED_TOKENS = 4, 16, 32
"""The generation check: the first tokens of this many held-out windows, continued greedily this far."""
BUILDER = {"builder int4 (default: symmetric RTN)": [],
           "builder k_quant_mixed (int8 head and sensitive layers)": ["algo_config=k_quant_mixed"]}


def smollm2_data(window: int, count: int) -> tuple[Path, dict[str, list[np.ndarray]], list[torch.Tensor], list[int]]:
    """The packaged SmolLM2's GGUF file (its tokenizer too); the texts perplexity is taken on (``count``
    windows of ``window`` tokens of the held-out pydoc split and of Python's ``LICENSE.txt``); 4
    calibration windows of 256 tokens and the token ids of the pydoc training split."""
    gguf = Path(resolve_model(MODEL))
    tokenizer = load_tokenizer(gguf)
    corpus = pydoc_corpus()
    license_text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    texts = {"pydoc held-out": windows(tokenizer.encode(corpus.text("test")), window, count),
             "LICENSE.txt": windows(tokenizer.encode(license_text), window, count)}
    train_ids = tokenizer.encode(corpus.text("train"))
    calibration = [torch.from_numpy(c[None]) for c in windows(train_ids, 256, 4)]
    return gguf, texts, calibration, train_ids


def windows(ids: list[int], length: int, count: int) -> list[np.ndarray]:
    usable = len(ids) // length
    return [np.asarray(ids[i * length:(i + 1) * length], dtype=np.int64) for i in range(min(usable, count))]


def ppl_torch(model: torch.nn.Module, chunks: list[np.ndarray], deployed: bool = True) -> float:
    """PyTorch's perplexity over ``chunks``; of the model as deployed (fake quantization on), or as it is."""
    with torch.no_grad(), qat.deployed(model) if deployed else contextlib.nullcontext():
        return float(np.mean([perplexity(model(torch.from_numpy(c)[None]).logits.numpy(), c[None], None) for c in chunks]))


def latent_perplexity(model: torch.nn.Module, chunks: list[np.ndarray]) -> float:
    """PyTorch perplexity of a prepared model with its fake quantization off: the float weights
    that QAT trained, without the rounding. Against the fine-tuned float model's, it splits QAT's
    gap into what training moved the weights by and what the rounding still costs."""
    qat.set_fake_quant(model, False)
    try:
        return ppl_torch(model, chunks, deployed=False)
    finally:
        qat.set_fake_quant(model, True)


def block_scales(folder: Path) -> dict[str, tuple[int, np.ndarray]]:
    """Each n-bit node of an exported folder → its bits and its block scales, read from the model."""
    model = onnx.load(str(folder / "model.onnx"))
    stored = {t.name: t for t in model.graph.initializer}
    return {node.name: (next((a.i for a in node.attribute if a.name == "bits"), 4), onnx.numpy_helper.to_array(stored[node.input[2]]))
            for node in model.graph.node if node.op_type in ("MatMulNBits", "GatherBlockQuantized")}


def scale_moves(start: Path, trained: Path) -> dict[int, np.ndarray]:
    """Bits → the relative change of every block scale from the PTQ folder ``start`` to the QAT folder ``trained``."""
    before, after = block_scales(start), block_scales(trained)
    moves: dict[int, list[np.ndarray]] = {}
    for name, (bits, scale) in before.items():
        moves.setdefault(bits, []).append(np.abs(after[name][1].astype(np.float64) / scale - 1).ravel())
    return {bits: np.concatenate(parts) for bits, parts in sorted(moves.items())}


def decode_speed(model: og.Model, prompt: np.ndarray, new_tokens: int = 128) -> float:
    return 1.0 / runtime_greedy(model, prompt.tolist(), new_tokens)[1]


def prefill_seconds(model: og.Model, prompt: np.ndarray) -> float:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 1, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt.astype(np.int32)[None])
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def build_with_builder(source: Path, out: Path, options: list[str]) -> Path:
    if not (out / "genai_config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out), "-p", "int4", "-e", "cpu"]
        if options:
            command += ["--extra_options", *options]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def fine_tune(model: torch.nn.Module, train_ids: list[int], args: argparse.Namespace, quantized: bool = False,
              teacher: torch.nn.Module | None = None) -> torch.nn.Module:
    """``args.qat_steps`` AdamW steps on random ``args.batch × args.seq`` windows of the training
    split, the same windows for every model (a fixed seed): QAT when ``model`` is prepared, the
    fair float baseline when it is not. The loss: next-token cross-entropy on the text, or with a
    ``teacher``, the KL divergence from the teacher's next-token distributions to the model's at
    every position (distillation: the float model's whole distribution rather than one token)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor(train_ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    model.train()
    if quantized:
        qat.set_observers(model, False)  # ranges from calibration; learnable scales train from there
    start = time.perf_counter()
    for step in range(args.qat_steps):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=generator)
        batch = torch.stack([ids[s:s + args.seq] for s in starts.tolist()])
        if teacher is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            with torch.no_grad():
                target = torch.log_softmax(teacher(input_ids=batch).logits.float(), dim=-1)
            logits = torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
            loss = torch.nn.functional.kl_div(logits, target, log_target=True, reduction="none").sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.qat_steps - 1:
            print(f"{'QAT' if quantized else 'float'} step {step}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qat-llm-genai"), help="where the exported folders go")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=10, help="windows per text")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--qat-steps", type=int, default=0, help="also fine-tune float and QAT for this many steps (0: PTQ only)")
    parser.add_argument("--ptq", nargs="+", choices=list(OURS), default=list(OURS), help="our PTQ rows (default: all)")
    parser.add_argument("--qat-formats", nargs="+", choices=FORMATS, default=["W4 g32", "W4 per-channel"], help="the formats QAT runs at")
    parser.add_argument("--distill", nargs="+", choices=FORMATS, default=[], metavar="FORMAT",
                        help="also QAT these formats by distillation from the float model (KL divergence)")
    parser.add_argument("--fixed-scales", nargs="+", choices=FORMATS, default=[], metavar="FORMAT",
                        help="also QAT these formats with the calibrated scales kept (only the weights train)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    gguf, texts, calibration, train_ids = smollm2_data(args.window, args.windows)
    float_model = hf_model(MODEL, AutoModelForCausalLM).eval()

    rows, folders = [], {}
    prompts = [chunk[:PROMPT_TOKENS].tolist() for chunk in texts["pydoc held-out"][:PROMPTS]]
    cache_file = args.work / f"rows-{args.window}x{args.windows}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    """Rows measured by an earlier run with the same texts (a long run that stops resumes)."""

    def cached(name: str, folder: Path) -> bool:
        if name in cache and (folder / "genai_config.json").exists():
            folders[name] = folder
            rows.append(cache[name])
            print(f"{name}: measured earlier ({cache_file})", flush=True)
            return True
        return False

    def measure(name: str, folder: Path, model: torch.nn.Module | None, fmt: str | None = None) -> None:
        folders[name] = folder
        row = {"name": name, "format": fmt, "bytes": folder_bytes(folder)}
        for text, chunks in texts.items():
            row[f"{text} genai"] = runtime_perplexity(folder, chunks)
            row[f"{text} torch"] = ppl_torch(model, chunks) if model is not None else None
            if fmt is not None and fmt.startswith("QAT "):
                row[f"{text} latent"] = latent_perplexity(model, chunks)
        if model is not None:  # greedy continuations through the runtime against PyTorch's
            check = check_generation(model, folder, prompts, GENERATED_TOKENS)
            row["agreeing"], row["generated"] = sum(check.agreeing), sum(len(t) for t in check.pytorch)
        rows.append(row)
        cache[name] = row
        cache_file.write_text(json.dumps(cache, indent=1))
        print(json.dumps(row), flush=True)

    def export(model: torch.nn.Module, folder: Path) -> Path:
        if not (folder / "genai_config.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            # INPUT_RTOL, not the default 5 %: in int8 input blocks, an input within float rounding of a
            # half-way point rounds the other way in ONNX Runtime's kernel (another summation order), and
            # the step propagates; on SmolLM2 that moves the largest logit by 3-12 %: 2.9 % at W4 g32 (as
            # much within PyTorch alone, the same tokens run as 15 and as 16), 5.5 % at W4 per channel,
            # 12.3 % at W4 per channel with MSE ranges (PyTorch alone 6.3 %; with the inputs unquantized,
            # 15 against 16 tokens agree to 5e-6 of the largest logit). The table's perplexities and greedy
            # agreement measure what it does to the model.
            rtol = INPUT_RTOL if qat.is_prepared(model) else DEFAULT_RTOL
            print(qat.export_genai(model, folder, tokenizer=gguf, rtol=rtol), flush=True)
        return folder

    def ptq(weight: dict, rules: list) -> torch.nn.Module:
        model = qat.prepare(copy.deepcopy(float_model), {"weight": weight, "activation": INT8_BLOCKS, "rules": rules})
        qat.calibrate(model, calibration)
        return model

    name = "float (de-quantized Q4_1)"
    if not cached(name, args.work / "float"):
        measure(name, export(float_model, args.work / "float"), float_model)
    source = args.work / "hf"
    if not (source / "config.json").exists():
        save_hf_folder(float_model, source, tokenizer=gguf)
    for index, (name, options) in enumerate(BUILDER.items()):
        if not cached(name, args.work / f"builder{index}"):
            measure(name, build_with_builder(source, args.work / f"builder{index}", options), None)
    for index, (key, (name, fmt, weight, rules)) in enumerate(OURS.items()):
        if key in args.ptq and not cached(name, args.work / f"ours{index}"):
            model = ptq(weight, rules)
            measure(name, export(model, args.work / f"ours{index}"), model, fmt)
            del model
    measured = [row for row in rows if row["format"] in FORMATS]
    best = {fmt: min((r for r in measured if r["format"] == fmt), key=lambda r: r["pydoc held-out genai"])["name"]
            for fmt in {r["format"] for r in measured}}  # format → its best PTQ row

    if args.qat_steps:
        name = f"float fine-tuned ({args.qat_steps} steps)"
        if not cached(name, args.work / f"float-ft{args.qat_steps}"):
            tuned = fine_tune(copy.deepcopy(float_model), train_ids, args, None)
            measure(name, export(tuned, args.work / f"float-ft{args.qat_steps}"), tuned)
            del tuned
        variants = ([(fmt, "labels") for fmt in args.qat_formats] + [(fmt, "distill") for fmt in args.distill]
                    + [(fmt, "fixed") for fmt in args.fixed_scales])
        for fmt, variant in variants:
            index, (_, _, weight, rules) = next((i, entry) for i, entry in enumerate(OURS.values()) if entry[0] == best[fmt])
            start = best[fmt].split(", ", 1)[1]  # its rule and observer: a cached row names the PTQ it started from
            says, suffix = QAT_VARIANTS[variant]
            name = f"ours QAT {fmt} (from PTQ {start}), {says} ({args.qat_steps} steps)"
            folder = args.work / f"qat-ours{index}-{args.qat_steps}{'' if variant == 'labels' else '-' + variant}"
            if not cached(name, folder):
                model = ptq({**weight, "learnable": variant != "fixed"}, rules)
                model = fine_tune(model, train_ids, args, True, float_model if variant == "distill" else None)
                measure(name, export(model, folder), model, f"QAT {fmt}{suffix}")
                del model

    speed_names = ["float (de-quantized Q4_1)", "builder int4 (default: symmetric RTN)", best["W4 g32"]]
    models = {name: og.Model(str(folders[name])) for name in speed_names}
    prompt = texts["pydoc held-out"][0]
    decode, prefill = {n: [] for n in speed_names}, {n: [] for n in speed_names}
    for _ in range(args.repeats):
        for name, model in models.items():
            decode[name].append(decode_speed(model, prompt[:16]))
            prefill[name].append(prefill_seconds(model, prompt))
    speed = {n: (statistics.median(decode[n]), statistics.median(prefill[n])) for n in speed_names}
    print(json.dumps(speed), flush=True)

    text_names = list(texts)
    lines = ["| model | size (MiB) | " + " | ".join(f"{t}: genai / PyTorch" for t in text_names) + " | greedy tokens as PyTorch's |",
             "|---|---:|" + "---:|" * len(text_names) + "---:|"]
    for row in rows:
        cells = [f"{row[f'{t} genai']:.2f} / {row[f'{t} torch']:.2f}" if row[f"{t} torch"] is not None else f"{row[f'{t} genai']:.2f} / –"
                 for t in text_names]
        cells.append(f"{row['agreeing']} of {row['generated']}" if "agreeing" in row else "–")
        lines.append(f"| {row['name']} | {row['bytes'] / 2**20:.1f} | " + " | ".join(cells) + " |")
    builder, fp32 = speed["builder int4 (default: symmetric RTN)"][0], speed["float (de-quantized Q4_1)"][0]
    lines += ["", "| artifact | decode (tokens/s) | vs builder int4 | vs float | prefill of a window (s) |", "|---|---:|---:|---:|---:|"]
    for name, (rate, seconds) in speed.items():
        lines.append(f"| {name} | {rate:.1f} | {rate / builder:.2f}× | {rate / fp32:.2f}× | {seconds:.3f} |")
    by_name = {row["name"]: row for row in rows}
    qat_rows = {row["format"][4:]: row for row in rows if (row["format"] or "").startswith("QAT ")}  # "W4 g32[, variant]"
    if qat_rows:
        tuned = by_name[f"float fine-tuned ({args.qat_steps} steps)"]
        lines += ["", "| format | text | best PTQ | QAT | float fine-tuned | PTQ → QAT gap recovered | QAT vs float fine-tuned "
                  "| QAT's float weights, fake quantization off (PyTorch) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for label, qat_row in qat_rows.items():
            ptq_row = by_name[best[label.split(", ")[0]]]
            for t in text_names:
                p, q, f = ptq_row[f"{t} genai"], qat_row[f"{t} genai"], tuned[f"{t} genai"]
                latent = f"{qat_row[f'{t} latent']:.2f}" if f"{t} latent" in qat_row else "–"
                lines.append(f"| {label} | {t} | {p:.2f} | {q:.2f} | {f:.2f} | {(p - q) / (p - f):.0%} | {q / f - 1:+.1%} | {latent} |")
        lines += ["", f"QAT and the float fine-tune: {args.qat_steps} AdamW steps (lr {args.lr}) of {args.batch} × {args.seq} tokens "
                  "of the pydoc training split, the same windows for both; QAT starts from its format's best PTQ model "
                  "(lowest held-out perplexity through the runtime) and learns its scales; a distilled row learns from the float "
                  "model's next-token distributions (KL divergence) instead of the text's next tokens; a row with its scales "
                  "fixed keeps the calibrated ones and trains the weights alone. Perplexities through "
                  "onnxruntime-genai, but the last column: the weights QAT trained, with fake quantization off, in PyTorch."]
    formats = "" if args.qat_formats == parser.get_default("qat_formats") else f" --qat-formats {shlex.join(args.qat_formats)}"
    formats += f" --distill {shlex.join(args.distill)}" if args.distill else ""
    formats += f" --fixed-scales {shlex.join(args.fixed_scales)}" if args.fixed_scales else ""
    ptq_rows = "" if args.ptq == list(OURS) else f" --ptq {shlex.join(args.ptq)}"
    command = f"python benchmarks/llm_genai.py{ptq_rows}{f' --qat-steps {args.qat_steps}{formats}' if args.qat_steps else ''} --write"
    if qat_rows:  # how far QAT moved the block scales from the PTQ it started from, by bits
        lines += ["", "| QAT | weight bits | block scales | moved: median | 90th percentile | largest |", "|---|---:|---:|---:|---:|---:|"]
        for label, qat_row in qat_rows.items():
            for bits, moved in scale_moves(folders[best[label.split(", ")[0]]], folders[qat_row["name"]]).items():
                lines.append(f"| {label} | {bits} | {moved.size} | {np.median(moved):.1%} | {np.percentile(moved, 90):.1%} | "
                             f"{moved.max():.0%} |")
    lines += ["", f"Greedy tokens as PyTorch's: the first {PROMPT_TOKENS} tokens of {PROMPTS} held-out windows continued "
              f"{GENERATED_TOKENS} tokens through onnxruntime-genai and in PyTorch, the tokens that agree before the first difference.",
              "", f"Perplexity over {args.windows} windows of {args.window} tokens per text; speed at batch 1, median of {args.repeats} "
              f"alternating runs. Command: `{command}`; {cpu_description()}; onnxruntime-genai "
              f"{og.__version__}, torch {torch.__version__.split('+')[0]}; {time.strftime('%Y-%m-%d')}."]
    print("\n".join(lines))
    if args.write:
        write_block("llm-genai", lines)


if __name__ == "__main__":
    main()
