"""ONNX Runtime latency of an exported artifact: the median of timed runs after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from qat.export.parity import run_session


def median_latency_ms(session: ort.InferenceSession, feeds: Sequence[np.ndarray], runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``session.run`` in milliseconds, inputs given in the graph's order.

    The median, not the mean: on a shared machine a few runs are slowed by other work, and the
    median ignores them.

    Example::

        session = qat.export.exporter.load_session("model.ort.onnx")
        median_latency_ms(session, [x.numpy()])
    """
    if runs < 1:
        raise ValueError(f"runs must be ≥ 1; got {runs}")
    for _ in range(warmup):
        run_session(session, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run_session(session, feeds)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
