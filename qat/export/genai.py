"""``export_genai``: a folder that onnxruntime-genai's generation loop loads and runs.

The folder holds ``model.onnx`` (+ ``model.onnx.data``), the decoder with a key-value cache
(:mod:`qat.export.genai_graph`); ``genai_config.json``, which names its inputs and outputs for the
runtime; the tokenizer files; and ``qparams.json``, the calibration sidecar: for every stored
layer, its operator, the initializers that hold its codes, scales and zero points, and its weight
and input formats.

Before the folder appears, ONNX Runtime runs the graph twice on the same tokens: the whole
sequence at once, and a prefix followed by one token at a time through the cache; both must agree
with PyTorch within ``rtol`` of the largest logit. The folder is built under a temporary name and
renamed at the end, so a failed export leaves nothing behind.

Example::

    result = qat.export_genai(model, "smollm2-int4", tokenizer="path/to/tokenizer_folder")
    # python -c "import onnxruntime_genai as og; og.Model('smollm2-int4')"
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from qat.atomic import check_new_folder, new_folder
from qat.errors import QATError
from qat.export.genai_graph import SUPPORTED, DecoderGraph, causal_lm
from qat.export.parity import Parity, perplexity
from qat.export.sidecar import sha256
from qat.tokenizer_files import load_hf_tokenizer
from qat.training.control import deployed
from qat.version import __version__

DEFAULT_RTOL = 0.05
FORMAT = "lightning-qat.genai.qparams"
VERSION = "1.0"
MODEL_FILE, DATA_FILE, CONFIG_FILE, SIDECAR_FILE = "model.onnx", "model.onnx.data", "genai_config.json", "qparams.json"
NBIT_OPS = ("MatMulNBits", "GatherBlockQuantized")
"""The n-bit kernels a stored layer can run on (the others are float MatMul and Gather)."""


@dataclass(frozen=True)
class GenaiExport:
    """What :func:`export_genai` wrote and what verification measured.

    Attributes:
        folder: the folder onnxruntime-genai loads.
        files: file name → bytes.
        layers: stored layer → its operator, bit width, block size, accuracy level and initializers.
        parity: the whole sequence through ONNX Runtime against PyTorch.
        cached_max_abs_diff: the largest logit difference between the cached path (prefix, then one
            token at a time) and PyTorch.
    """

    folder: Path
    files: dict[str, int]
    layers: dict[str, dict[str, Any]]
    parity: Parity
    cached_max_abs_diff: float

    @property
    def bytes(self) -> int:
        return sum(size for name, size in self.files.items() if name.startswith("model.onnx"))

    def __str__(self) -> str:
        nbits = sum(1 for entry in self.layers.values() if entry["op"] in NBIT_OPS)
        return (f"{self.folder}: {self.bytes / 2**20:.1f} MiB, {nbits} of {len(self.layers)} layers on n-bit kernels; "
                f"{self.parity.describe()}, cached path {self.cached_max_abs_diff:.3g}")


def _hf_tokenizer(tokenizer: Any) -> Any:
    """A Hugging Face fast tokenizer from an object or a path (folder, tokenizer.json, GGUF file)."""
    if tokenizer is None:
        raise QATError("export_genai needs the model's tokenizer (tokenizer=folder, tokenizer.json, GGUF file or tokenizer object): "
                       "onnxruntime-genai reads it from the exported folder")
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    backend = getattr(tokenizer, "backend", tokenizer)
    if type(backend).__module__.startswith("tokenizers"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=backend)
    return load_hf_tokenizer(Path(tokenizer).expanduser())


def check_folder(folder: Path) -> None:
    """QATError when ``folder`` exists and is not an empty folder (an export never overwrites)."""
    check_new_folder(folder, "export_genai")


def genai_config(lm: nn.Module, n_layers: int, head_size: int, context_length: int) -> dict[str, Any]:
    """``genai_config.json``: the decoder's file, sizes and input/output names, and greedy search by default."""
    config = lm.config
    generation = getattr(lm, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) or config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else eos
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": config.bos_token_id, "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": head_size, "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_attention_heads, "num_hidden_layers": n_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos, "pad_token_id": pad, "type": SUPPORTED[config.model_type], "vocab_size": config.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _feeds(ids: np.ndarray, past: list[np.ndarray] | None, n_layers: int, kv_heads: int, head_size: int) -> dict[str, np.ndarray]:
    batch, length = ids.shape
    past_length = 0 if past is None else past[0].shape[2]
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, past_length + length), np.int64)}
    empty = np.zeros((batch, kv_heads, 0, head_size), np.float32)
    for i in range(n_layers):
        for j, part in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{part}"] = empty if past is None else past[2 * i + j]
    return feeds


def verify_decoder(lm: nn.Module, onnx_path: Path, ids: np.ndarray, prefix: int) -> tuple[Parity, float]:
    """Run ``onnx_path`` on ``ids`` whole, then as ``ids[:, :prefix]`` followed by one token at a
    time through the cache; return the whole run's :class:`Parity` against ``lm`` and the cached
    run's largest logit difference from PyTorch."""
    config = lm.config
    n_layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = lm(torch.from_numpy(ids)).logits.float().numpy()
    whole = session.run(None, _feeds(ids, None, n_layers, kv_heads, head_size))[0]
    outputs = session.run(None, _feeds(ids[:, :prefix], None, n_layers, kv_heads, head_size))
    steps, past = [outputs[0]], outputs[1:]
    for t in range(prefix, ids.shape[1]):
        outputs = session.run(None, _feeds(ids[:, t:t + 1], past, n_layers, kv_heads, head_size))
        steps.append(outputs[0])
        past = outputs[1:]
    cached = np.concatenate(steps, axis=1)
    for name, logits in (("whole sequence", whole), ("cached", cached)):
        if not np.isfinite(logits).all():
            raise QATError(f"export_genai: ONNX Runtime's {name} logits are not all finite")
    ppl = {"torch": perplexity(reference, ids, None), "onnx": perplexity(whole, ids, None)}
    ppl["delta"] = ppl["onnx"] - ppl["torch"]
    parity = Parity(int(ids.shape[0]), float(np.abs(whole - reference).max()), float(np.abs(reference).max()), None, ppl)
    return parity, float(np.abs(cached - reference).max())


def _sidecar(model: nn.Module, graph: DecoderGraph, folder: Path, verification: dict[str, Any]) -> dict[str, Any]:
    modules = dict(model.named_modules())
    layers = {}
    for name, entry in graph.layers.items():
        module = modules.get(name)
        weight_q, input_q = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
        layers[name] = {**entry, "weight_format": weight_q.spec.to_dict() if weight_q is not None and entry["op"] != "MatMul" else None,
                        "input_format": input_q.spec.to_dict() if input_q is not None else None}
    return {"format": FORMAT, "version": VERSION,
            "producer": {"name": "lightning-qat", "version": __version__, "torch": torch.__version__.split("+")[0]},
            "model": {"file": MODEL_FILE, "kind": "genai", "type": SUPPORTED[graph.config.model_type],
                      "sha256": sha256(folder / MODEL_FILE), "data_sha256": sha256(folder / DATA_FILE)},
            "layers": layers, "verification": verification}


def export_genai(
    model: nn.Module,
    folder: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    context_length: int | None = None,
    rtol: float = DEFAULT_RTOL,
    example_ids: torch.Tensor | np.ndarray | None = None,
) -> GenaiExport:
    """Export a Llama-family causal LM (prepared or float) as an onnxruntime-genai folder.

    Args:
        model: a Hugging Face ``…ForCausalLM`` of type llama, mistral or qwen2, or a module holding
            one (a LightningModule); quantized layers are stored as their quantizers say.
        folder: a new (or empty) folder.
        tokenizer: the model's tokenizer: a Hugging Face tokenizer, a ``tokenizers.Tokenizer``, or a
            tokenizer folder, ``tokenizer.json`` or GGUF file.
        context_length: the longest sequence the runtime may generate; default the model's
            ``max_position_embeddings``.
        rtol: the largest logit difference allowed, as a share of the largest PyTorch logit.
        example_ids: the tokens verification runs, ``(batch, length)``; default 2 × 16 fixed ones.

    Returns:
        :class:`GenaiExport`.

    Raises:
        QATError: an unsupported architecture or layer format, a missing tokenizer, a folder that
            is not empty, or ONNX Runtime beyond ``rtol`` (nothing is written then).
    """
    folder = Path(folder).expanduser()
    check_folder(folder)
    lm = causal_lm(model)
    hf_tokenizer = _hf_tokenizer(tokenizer)
    config = lm.config
    longest = int(getattr(config, "max_position_embeddings", 0) or 4096)
    context_length = min(longest, int(context_length or longest))
    if example_ids is None:
        example_ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ids = np.asarray(example_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise QATError(f"example_ids: need (batch, length ≥ 2) token ids; got shape {tuple(ids.shape)}")
    names = {module: name for name, module in model.named_modules()}
    with new_folder(folder, "export_genai") as work:
        with deployed(model):
            graph = DecoderGraph(lm, names, context_length)
            proto = graph.build()
            onnx.save_model(proto, work / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE,
                            size_threshold=1024)
            del proto
            parity, cached = verify_decoder(lm, work / MODEL_FILE, ids, max(1, ids.shape[1] // 2))
        failure = parity.failure(rtol)
        if failure is None and not cached <= rtol * max(parity.output_scale, 1e-12):
            failure = f"the cached path's largest difference is {cached:.4g} (largest output {parity.output_scale:.4g}), allowed {rtol:.0%}"
        if failure:
            raise QATError(f"export_genai: ONNX Runtime disagrees with PyTorch: {failure}")
        hf_tokenizer.save_pretrained(str(work))
        head_size = graph.head_size
        (work / CONFIG_FILE).write_text(json.dumps(genai_config(lm, len(lm.model.layers), head_size, context_length), indent=4))
        verification = {"samples": parity.samples, "max_abs_diff": parity.max_abs_diff, "output_scale": parity.output_scale,
                        "cached_max_abs_diff": cached, "rtol": rtol, "perplexity": parity.perplexity}
        sidecar = _sidecar(model, graph, work, verification)
        (work / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=1))
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    return GenaiExport(folder, files, graph.layers, parity, cached)


@dataclass(frozen=True)
class GenerationCheck:
    """Greedy continuations of the same prompts through onnxruntime-genai and in PyTorch.

    Attributes:
        prompts: the prompts' token ids.
        runtime: each prompt's new tokens from onnxruntime-genai's generation loop.
        pytorch: each prompt's new tokens from ``generate`` of the model as trained.
        decode_ms_per_token: the runtime's time per new token at batch 1 after the prompt
            (median over the prompts).
    """

    prompts: list[list[int]]
    runtime: list[list[int]]
    pytorch: list[list[int]]
    decode_ms_per_token: float

    @property
    def agreeing(self) -> list[int]:
        """Per prompt, how many new tokens agree before the first that differs."""
        return [next((i for i, (a, b) in enumerate(zip(r, p)) if a != b), min(len(r), len(p)))
                for r, p in zip(self.runtime, self.pytorch)]

    def describe(self) -> str:
        total = sum(len(p) for p in self.pytorch)
        return (f"greedy generation: {sum(self.agreeing)} of {total} new tokens agree with PyTorch before the first difference "
                f"({len(self.prompts)} prompts); {self.decode_ms_per_token:.1f} ms per new token")


def runtime_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """The new tokens onnxruntime-genai's generation loop appends to ``prompt`` greedily (at most
    ``max_new_tokens``, fewer where an end-of-sequence token comes first), and the seconds the
    loop took per new token after the prompt. ``model``: an ``onnxruntime_genai.Model``."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    start, count = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    seconds = (time.perf_counter() - start) / max(count, 1)
    return [int(t) for t in generator.get_sequence(0)][len(prompt):], seconds


def runtime_perplexity(folder: str | os.PathLike[str], windows: list[np.ndarray]) -> float:
    """Mean next-token perplexity of token ``windows`` (1-D id arrays) computed from the logits
    onnxruntime-genai's generation loop produces for each whole window: the deployed model's own
    numbers, for any folder the runtime loads (ours or its model builder's).

    Example::

        ids = np.asarray(tokenizer.encode(text))
        runtime_perplexity("smollm2-int4", [ids[i:i + 1024] for i in range(0, len(ids) - 1023, 1024)])
    """
    import onnxruntime_genai as og

    if not windows or any(len(w) < 2 for w in windows):
        raise QATError("runtime_perplexity needs at least one window, each of at least two tokens")
    model = og.Model(str(folder))
    values = []
    for window in windows:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(window) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(window, dtype=np.int32)[None])
        values.append(perplexity(np.asarray(generator.get_output("logits")), np.asarray(window)[None], None))
    return float(np.mean(values))


@torch.no_grad()
def pytorch_greedy(model: nn.Module, prompt: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                   pad_token_id: int | None = None) -> list[int]:
    """The new tokens ``generate`` of the model as trained (its fake quantization on, no
    observing) appends to ``prompt``, greedily, stopping at ``eos_token_id`` as the runtime does."""
    lm = causal_lm(model)
    ids = torch.tensor([prompt], device=next(lm.parameters()).device)
    with deployed(model):
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return out[0, len(prompt):].tolist()


def check_generation(model: nn.Module, folder: str | os.PathLike[str], prompts: list[list[int]],
                     max_new_tokens: int = 32) -> GenerationCheck:
    """Greedy continuations of ``prompts`` through the exported ``folder`` and in PyTorch, side by
    side: the same tokens, up to the float rounding of the runtime's kernels (which, in a long
    continuation, can tip a near-tie between two tokens one way or the other)."""
    import onnxruntime_genai as og

    if not prompts or not all(prompts):
        raise QATError("check_generation needs at least one prompt, each of at least one token")
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())["model"]
    runtime_model = og.Model(str(folder))
    runtime = [runtime_greedy(runtime_model, list(p), max_new_tokens) for p in prompts]
    pytorch = [pytorch_greedy(model, list(p), max_new_tokens, config.get("eos_token_id"), config.get("pad_token_id")) for p in prompts]
    return GenerationCheck([list(p) for p in prompts], [tokens for tokens, _ in runtime], pytorch,
                           1000 * statistics.median(seconds for _, seconds in runtime))
