"""How closely ONNX Runtime reproduces the PyTorch fake-quant model.

The figures written into every sidecar's ``verification`` block:

- ``max_abs_diff`` over all outputs and verification batches, against ``output_scale`` (the
  largest PyTorch output magnitude); beyond ``rtol · output_scale`` the export fails (except for
  sentence embeddings, below). Padding
  positions (``attention_mask == 0``) are left out: a padded query attends to nothing, so its
  output is whatever each runtime makes of an all-masked softmax, and nothing reads it;
- ``top1_agreement`` for classifiers (2-D outputs): the share of rows where both pick the same
  class;
- ``perplexity`` for language models (a Hugging Face model's ``logits``, with ``input_ids``
  among the inputs): the
  next-token perplexity of each side's logits on the inputs' own tokens, padding positions
  (``attention_mask == 0``) excluded, and the difference ONNX − PyTorch;
- ``embedding`` for sentence-embedding models (``returns_embeddings = True``; the first output is
  one vector per row): per sentence, the distance ``‖ORT − PyTorch‖ / ‖PyTorch‖`` (mean and
  largest) and the cosine similarity (mean and smallest). The export fails when the *mean*
  distance exceeds ``rtol``. Why not the largest element difference: a deep transformer with
  static per-tensor 8-bit activations is discontinuous, and a perturbation at float rounding
  level (1e-6, any two runtimes summing in a different order) flips a code in some sentence and
  moves that sentence's embedding by several percent, in PyTorch alone as much as between ORT
  and PyTorch. What the model is used for, retrieval by cosine, sees the average sentence; an
  export bug (a wrong scale, a missing layer) moves every sentence and fails the check.
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
    embedding: dict[str, float] | None = None
    """Sentence embeddings: ``distance_mean``, ``distance_max``, ``cosine_mean``, ``cosine_min``."""

    def within(self, rtol: float) -> bool:
        """Whether ORT is close enough: the mean per-sentence distance for embeddings, else the largest difference."""
        if self.embedding is not None:
            return self.embedding["distance_mean"] <= rtol
        return self.max_abs_diff <= rtol * max(self.output_scale, 1e-12)

    def describe(self) -> str:
        """The figure :meth:`within` judges, in words (for error messages)."""
        if self.embedding is not None:
            e = self.embedding
            return (f"each embedding is on average {e['distance_mean']:.2%} of its length away (worst {e['distance_max']:.2%}, "
                    f"smallest cosine {e['cosine_min']:.4f})")
        return f"the largest difference is {self.max_abs_diff:.4g} (largest output {self.output_scale:.4g})"


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


def embedding_agreement(onnx_rows: np.ndarray, torch_rows: np.ndarray) -> dict[str, float]:
    """Per-row distance ``‖o − r‖ / ‖r‖`` and cosine between two (rows, features) arrays.

    Example:
        >>> agreement = embedding_agreement(np.array([[1.0, 0.0], [0.0, 2.2]]), np.array([[1.0, 0.0], [0.0, 2.0]]))
        >>> {name: round(value, 3) for name, value in agreement.items()}  # the second row is 10 % longer
        {'distance_mean': 0.05, 'distance_max': 0.1, 'cosine_mean': 1.0, 'cosine_min': 1.0}
    """
    o, r = onnx_rows.astype(np.float64), torch_rows.astype(np.float64)
    norm_o, norm_r = np.linalg.norm(o, axis=-1), np.maximum(np.linalg.norm(r, axis=-1), 1e-12)
    distance = np.linalg.norm(o - r, axis=-1) / norm_r
    cosine = (o * r).sum(-1) / np.maximum(norm_o * norm_r, 1e-12)
    return {"distance_mean": float(distance.mean()), "distance_max": float(distance.max()),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


OUTPUT_KINDS = ("logits", "embeddings")
"""What a model's first output is, when the parity check should judge it by its use: ``logits``
(a language model's next-token logits: perplexity), ``embeddings`` (one vector per row: distance
and cosine)."""


def compare(onnx_outputs: Sequence[Sequence[np.ndarray]], torch_outputs: Sequence[Sequence[np.ndarray]],
            inputs: Sequence[Mapping[str, np.ndarray]], output_kind: str | None = None) -> Parity:
    """Parity over several batches: ``onnx_outputs[i]`` and ``torch_outputs[i]`` are batch ``i``'s outputs,
    ``inputs[i]`` its named inputs; ``output_kind``: one of :data:`OUTPUT_KINDS` or None (plain tensors)."""
    if output_kind not in (None, *OUTPUT_KINDS):
        raise ValueError(f"output_kind: {output_kind!r} is not one of {OUTPUT_KINDS} or None")
    max_abs_diff, output_scale, agree, rows = 0.0, 0.0, 0, 0
    ppl_torch, ppl_onnx, embedded, embedded_reference = [], [], [], []
    for got, want, feeds in zip(onnx_outputs, torch_outputs, inputs, strict=True):
        mask = feeds.get("attention_mask")
        for o, r in zip(got, want, strict=True):
            if mask is not None and r.shape[: mask.ndim] == mask.shape:
                o, r = o[mask.astype(bool)], r[mask.astype(bool)]
            max_abs_diff = max(max_abs_diff, float(np.abs(o.astype(np.float32) - r).max()))
            output_scale = max(output_scale, float(np.abs(r).max()))
        first, reference = got[0], want[0]
        if output_kind == "embeddings" and reference.ndim == 2:
            embedded.append(first)
            embedded_reference.append(reference)
        elif reference.ndim == 2:
            agree += int((first.argmax(-1) == reference.argmax(-1)).sum())
            rows += reference.shape[0]
        # perplexity needs a next token: a decode step (one position) has none
        if output_kind == "logits" and reference.ndim == 3 and "input_ids" in feeds and feeds["input_ids"].shape[-1] > 1:
            ppl_torch.append(perplexity(reference, feeds["input_ids"], mask))
            ppl_onnx.append(perplexity(first, feeds["input_ids"], mask))
    ppl = None
    if ppl_torch:
        torch_ppl, onnx_ppl = float(np.mean(ppl_torch)), float(np.mean(ppl_onnx))
        ppl = {"torch": torch_ppl, "onnx": onnx_ppl, "delta": onnx_ppl - torch_ppl}
    embedding = embedding_agreement(np.concatenate(embedded), np.concatenate(embedded_reference)) if embedded else None
    return Parity(len(inputs), max_abs_diff, output_scale, agree / rows if rows else None, ppl, embedding)


def to_dict(parity: Parity, rtol: float) -> dict[str, Any]:
    return {"samples": parity.samples, "max_abs_diff": parity.max_abs_diff, "output_scale": parity.output_scale, "rtol": rtol,
            "top1_agreement": parity.top1_agreement, "perplexity": parity.perplexity, "embedding": parity.embedding}
