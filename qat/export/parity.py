"""How closely ONNX Runtime reproduces the PyTorch fake-quant model.

The figures written into every sidecar's ``verification`` block:

- ``max_abs_diff`` over all outputs and verification batches, against ``output_scale`` (the
  largest PyTorch output magnitude); beyond ``rtol · output_scale`` the export fails (except for
  sentence embeddings, below). Padding
  positions (``attention_mask == 0``) are left out: a padded query attends to nothing, so its
  output is whatever each runtime makes of an all-masked softmax, and nothing reads it;
- ``top1_agreement`` for classifiers (2-D outputs): the share of rows where both pick the same
  class; below ``min_top1`` the export fails (:func:`min_top1_for`);
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

Before any figure, every floating-point output of both sides must be finite (padding positions
excepted, as above): a NaN or an infinity fails the check with a message naming the side and the
output. NaN cannot hide in a figure either: a NaN difference makes ``max_abs_diff`` NaN, and
:meth:`Parity.within` is False for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from qat.errors import QATError


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

    def within(self, rtol: float, min_top1: float | None = None) -> bool:
        """Whether ORT is close enough (:meth:`failure` says why not)."""
        return self.failure(rtol, min_top1) is None

    def failure(self, rtol: float, min_top1: float | None = None) -> str | None:
        """Why ORT is not close enough, in words, or None: the mean per-sentence distance for embeddings,
        else the largest difference, beyond ``rtol``; then the top-1 agreement of a classifier, below
        ``min_top1`` (None: :func:`min_top1_for` ``rtol``). A NaN figure never passes."""
        if self.embedding is not None:
            close = self.embedding["distance_mean"] <= rtol
        else:
            close = self.max_abs_diff <= rtol * max(self.output_scale, 1e-12)
        if not close:  # also when a figure is NaN: every comparison with NaN is False
            return f"{self.describe()}, allowed {rtol:.0%}"
        min_top1 = min_top1_for(rtol) if min_top1 is None else min_top1
        if self.top1_agreement is not None and not self.top1_agreement >= min_top1:
            return f"ORT picks PyTorch's top-1 class in {self.top1_agreement:.1%} of the rows, allowed at least {min_top1:.0%}"
        return None

    def describe(self) -> str:
        """The figure :meth:`within` judges, in words (for error messages)."""
        if self.embedding is not None:
            e = self.embedding
            return (f"each embedding is on average {e['distance_mean']:.2%} of its length away (worst {e['distance_max']:.2%}, "
                    f"smallest cosine {e['cosine_min']:.4f})")
        return f"the largest difference is {self.max_abs_diff:.4g} (largest output {self.output_scale:.4g})"


def min_top1_for(rtol: float) -> float:
    """The least top-1 agreement a classifier must keep when none is given: ``1 − 2·rtol`` (0.9 at the
    default ``rtol`` 0.05; no requirement from ``rtol`` 0.5 on).

    Why tie it to ``rtol``: both say how far ONNX Runtime may drift from PyTorch, and whoever loosens
    one (an untrained model with tiny outputs, a CPU whose u8·s8 kernels saturate) means the other too.
    Why 2: ORT can pick another class than PyTorch only where PyTorch's two scores are within twice
    the largest difference, so the rows that flip are near-ties, and an export within ``rtol`` flips
    few of them; a trained classifier has few near-ties, while a broken layer (a wrong scale on the
    classifier) flips most rows."""
    return max(0.0, 1.0 - 2.0 * rtol)


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


def describe_non_finite(nan: int, inf: int, size: int) -> str | None:
    """``NaN (3 of 40 values)`` for a tensor of ``size`` values holding ``nan`` NaNs and ``inf``
    infinities, or None when it holds neither (the wording of every non-finite message)."""
    if not nan and not inf:
        return None
    kind = "NaN and Inf" if nan and inf else "NaN" if nan else "Inf"
    return f"{kind} ({nan + inf} of {size} values)"


def _non_finite(values: np.ndarray) -> str | None:
    """:func:`describe_non_finite` of an output (integer outputs: None)."""
    if not np.issubdtype(values.dtype, np.floating):
        return None
    return describe_non_finite(int(np.isnan(values).sum()), int(np.isinf(values).sum()), values.size)


def default_output_names(count: int) -> list[str]:
    """The names outputs go by when none are given: ``output``, or ``output_0``, ``output_1``, …"""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def compare(onnx_outputs: Sequence[Sequence[np.ndarray]], torch_outputs: Sequence[Sequence[np.ndarray]],
            inputs: Sequence[Mapping[str, np.ndarray]], output_kind: str | None = None,
            output_names: Sequence[str] | None = None) -> Parity:
    """Parity over several batches: ``onnx_outputs[i]`` and ``torch_outputs[i]`` are batch ``i``'s outputs,
    ``inputs[i]`` its named inputs; ``output_kind``: one of :data:`OUTPUT_KINDS` or None (plain tensors);
    ``output_names`` name the outputs in messages (default :func:`default_output_names`).

    Raises :class:`QATError` naming the side (PyTorch's first) and the output when an output holds NaN or Inf.
    """
    if output_kind not in (None, *OUTPUT_KINDS):
        raise ValueError(f"output_kind: {output_kind!r} is not one of {OUTPUT_KINDS} or None")
    max_abs_diff, output_scale, agree, rows = 0.0, 0.0, 0, 0
    ppl_torch, ppl_onnx, embedded, embedded_reference = [], [], [], []
    for batch, (got, want, feeds) in enumerate(zip(onnx_outputs, torch_outputs, inputs, strict=True)):
        mask = feeds.get("attention_mask")
        names = list(output_names) if output_names is not None else default_output_names(len(want))
        where = f" in batch {batch + 1} of {len(inputs)}" if len(inputs) > 1 else ""
        for o, r, name in zip(got, want, names, strict=True):
            if mask is not None and r.shape[: mask.ndim] == mask.shape:
                o, r = o[mask.astype(bool)], r[mask.astype(bool)]
            if (bad := _non_finite(r)) is not None:
                raise QATError(f"PyTorch's output `{name}` holds {bad}{where}: the model computes non-finite values on these "
                               "inputs, so ONNX Runtime cannot be checked against it; check the inputs and the model's weights")
            if (bad := _non_finite(o)) is not None:
                raise QATError(f"ONNX Runtime's output `{name}` holds {bad}{where} where PyTorch's is finite: the exported "
                               "graph does not compute what the model does")
            # np.maximum, not max(): a NaN difference must stay NaN, never be dropped by the fold
            max_abs_diff = float(np.maximum(max_abs_diff, np.abs(o.astype(np.float32) - r).max()))
            output_scale = float(np.maximum(output_scale, np.abs(r).max()))
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


def to_dict(parity: Parity, rtol: float, min_top1: float | None = None) -> dict[str, Any]:
    """The sidecar's ``verification`` figures; ``min_top1`` (classifiers only) as judged (None: from ``rtol``)."""
    judged = (min_top1_for(rtol) if min_top1 is None else min_top1) if parity.top1_agreement is not None else None
    return {"samples": parity.samples, "max_abs_diff": parity.max_abs_diff, "output_scale": parity.output_scale, "rtol": rtol,
            "top1_agreement": parity.top1_agreement, "min_top1": judged, "perplexity": parity.perplexity,
            "embedding": parity.embedding}
