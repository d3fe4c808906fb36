"""How closely ONNX Runtime reproduces the PyTorch fake-quant model.

The figures written into every sidecar's ``verification`` block:

- ``max_abs_diff`` over all outputs and verification batches, against ``output_scale`` (the
  largest PyTorch output magnitude); beyond ``rtol · output_scale`` the export fails. Padding
  positions (``attention_mask == 0``) are left out: a padded query attends to nothing, so its
  output is whatever each runtime makes of an all-masked softmax, and nothing reads it;
- ``top1_agreement`` for classifiers (2-D outputs): the share of rows where both pick the same
  class;
- ``perplexity`` for language models (a Hugging Face model's ``logits``, with ``input_ids``
  among the inputs): the
  next-token perplexity of each side's logits on the inputs' own tokens, padding positions
  (``attention_mask == 0``) excluded, and the difference ONNX − PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime vs PyTorch on the verification inputs."""

    samples: int
    max_abs_diff: float
    output_scale: float
    top1_agreement: float | None
    perplexity: dict[str, float] | None

    def within(self, rtol: float) -> bool:
        return self.max_abs_diff <= rtol * max(self.output_scale, 1e-12)


def run_session(session: ort.InferenceSession, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` with ``feeds`` given in the graph's input order."""
    names = [meta.name for meta in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds, strict=True)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def perplexity(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> float:
    """Next-token perplexity: position ``t`` predicts token ``t + 1``; masked targets are skipped."""
    log_probs = _log_softmax(logits[:, :-1].astype(np.float64))  # (B, T-1, V)
    targets = input_ids[:, 1:]
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # (B, T-1)
    keep = np.ones_like(picked, dtype=bool) if attention_mask is None else attention_mask[:, 1:].astype(bool)
    return math.exp(-picked[keep].mean())


def compare(onnx_outputs: Sequence[Sequence[np.ndarray]], torch_outputs: Sequence[Sequence[np.ndarray]],
            inputs: Sequence[Mapping[str, np.ndarray]], logits: bool = False) -> Parity:
    """Parity over several batches: ``onnx_outputs[i]`` and ``torch_outputs[i]`` are batch ``i``'s outputs,
    ``inputs[i]`` its named inputs; ``logits``: the first output is a language model's next-token logits."""
    max_abs_diff, output_scale, agree, rows = 0.0, 0.0, 0, 0
    ppl_torch, ppl_onnx = [], []
    for got, want, feeds in zip(onnx_outputs, torch_outputs, inputs, strict=True):
        mask = feeds.get("attention_mask")
        for o, r in zip(got, want, strict=True):
            if mask is not None and r.shape[: mask.ndim] == mask.shape:
                o, r = o[mask.astype(bool)], r[mask.astype(bool)]
            max_abs_diff = max(max_abs_diff, float(np.abs(o.astype(np.float32) - r).max()))
            output_scale = max(output_scale, float(np.abs(r).max()))
        first, reference = got[0], want[0]
        if reference.ndim == 2:
            agree += int((first.argmax(-1) == reference.argmax(-1)).sum())
            rows += reference.shape[0]
        if logits and reference.ndim == 3 and "input_ids" in feeds:
            ppl_torch.append(perplexity(reference, feeds["input_ids"], mask))
            ppl_onnx.append(perplexity(first, feeds["input_ids"], mask))
    ppl = None
    if ppl_torch:
        torch_ppl, onnx_ppl = float(np.mean(ppl_torch)), float(np.mean(ppl_onnx))
        ppl = {"torch": torch_ppl, "onnx": onnx_ppl, "delta": onnx_ppl - torch_ppl}
    return Parity(len(inputs), max_abs_diff, output_scale, agree / rows if rows else None, ppl)


def to_dict(parity: Parity, rtol: float) -> dict[str, Any]:
    return {"samples": parity.samples, "max_abs_diff": parity.max_abs_diff, "output_scale": parity.output_scale, "rtol": rtol,
            "top1_agreement": parity.top1_agreement, "perplexity": parity.perplexity}
