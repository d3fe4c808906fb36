"""`qat.export.parity`: how ONNX Runtime's outputs are judged against PyTorch's, per kind of output."""

from __future__ import annotations

import numpy as np
import pytest

from qat.export import parity


def embeddings(rows: int = 20, features: int = 16, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def test_one_sentence_moved_by_a_code_flip_passes_as_embeddings_but_not_as_plain_tensors():
    reference = embeddings()
    onnx = reference.copy()
    onnx[3] += 0.1 * embeddings(1, seed=1)[0]  # one sentence 10 % away, the rest identical
    judged = parity.compare([[onnx]], [[reference]], [{}], "embeddings")
    assert judged.embedding["distance_max"] == pytest.approx(0.1, rel=1e-5)
    assert judged.embedding["distance_mean"] == pytest.approx(0.1 / 20, rel=1e-5)
    assert judged.embedding["cosine_min"] < 0.999 < judged.embedding["cosine_mean"]
    assert judged.within(0.05) and judged.top1_agreement is None
    plain = parity.compare([[onnx]], [[reference]], [{}])
    assert plain.embedding is None and not plain.within(0.05)


def test_every_sentence_off_fails_and_says_by_how_much():
    reference = embeddings()
    judged = parity.compare([[1.1 * reference]], [[reference]], [{}], "embeddings")  # a wrong scale: all rows 10 % long
    assert judged.embedding["distance_mean"] == pytest.approx(0.1, rel=1e-5)
    assert judged.embedding["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert not judged.within(0.05) and judged.within(0.11)
    assert "on average 10.00% of its length away" in judged.describe()


def test_embeddings_pool_rows_over_batches_and_unknown_kinds_are_refused():
    a, b = embeddings(4, seed=2), embeddings(6, seed=3)
    moved = b.copy()
    moved[0] = -moved[0]  # distance 2, cosine −1
    judged = parity.compare([[a], [moved]], [[a], [b]], [{}, {}], "embeddings")
    assert judged.embedding["distance_mean"] == pytest.approx(2 / 10, rel=1e-5)
    assert judged.embedding["cosine_min"] == pytest.approx(-1.0, abs=1e-6)
    assert judged.samples == 2
    with pytest.raises(ValueError, match="output_kind: 'vectors' is not one of"):
        parity.compare([[a]], [[a]], [{}], "vectors")


@pytest.mark.filterwarnings("error")
def test_a_decode_step_has_no_perplexity_and_no_warning():
    logits = np.random.default_rng(0).standard_normal((1, 1, 8)).astype(np.float32)
    judged = parity.compare([[logits]], [[logits]], [{"input_ids": np.array([[3]])}], "logits")
    assert judged.perplexity is None and judged.max_abs_diff == 0.0
    two = np.concatenate([logits, logits], axis=1)
    assert parity.compare([[two]], [[two]], [{"input_ids": np.array([[3, 5]])}], "logits").perplexity["delta"] == 0.0


def test_padding_positions_may_hold_nan_on_either_side():
    """A fully masked query has no defined output: NaN there is left out, as its difference is."""
    logits = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    onnx, reference = logits.copy(), logits.copy()
    onnx[0, 2:], reference[0, 3] = np.nan, np.inf
    judged = parity.compare([[onnx]], [[reference]], [{"attention_mask": np.array([[1, 1, 0, 0]])}])
    assert judged.max_abs_diff == 0.0 and judged.within(0.0)


def test_a_nan_figure_never_passes():
    judged = parity.Parity(samples=1, max_abs_diff=float("nan"), output_scale=1.0, top1_agreement=None, perplexity=None)
    assert not judged.within(1e9)
    assert judged.failure(0.05) == "the largest difference is nan (largest output 1), allowed 5%"


def test_the_top1_threshold_follows_rtol_and_is_recorded_for_classifiers_only():
    assert [parity.min_top1_for(r) for r in (0.0, 0.05, 0.3, 0.5, 10.0)] == pytest.approx([1.0, 0.9, 0.4, 0.0, 0.0])
    classifier = parity.Parity(samples=1, max_abs_diff=0.0, output_scale=1.0, top1_agreement=0.85, perplexity=None)
    assert not classifier.within(0.05) and classifier.within(0.05, min_top1=0.85) and classifier.within(0.1)
    assert parity.to_dict(classifier, 0.05)["min_top1"] == 0.9 and parity.to_dict(classifier, 0.05, 0.8)["min_top1"] == 0.8
    plain = parity.Parity(samples=1, max_abs_diff=0.0, output_scale=1.0, top1_agreement=None, perplexity=None)
    assert parity.to_dict(plain, 0.05)["min_top1"] is None
