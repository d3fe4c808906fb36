"""Deterministic train / validation / test splits.

The same ``(n, fractions, seed)`` gives the same indices on every machine and every run: the
permutation comes from NumPy's PCG64 generator, whose stream NumPy keeps stable across releases,
and each class is split on its own (stratified), so a small test set still holds every class in
the dataset's proportions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qat.errors import QATError


def stratified_split(labels: Sequence[int] | np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0) -> list[np.ndarray]:
    """Indices of each part (sorted), every class divided by ``fractions``.

    Example:
        >>> train, val, test = stratified_split([0, 1] * 50, (0.8, 0.1, 0.1))
        >>> len(train), len(val), len(test), sorted(set(train) & set(test))
        (80, 10, 10, [])
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise QATError(f"split fractions `{fractions}` must be non-negative and sum to 1")
    labels = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(np.cumsum(fractions) * len(members)).astype(int)
        for part, (start, stop) in enumerate(zip(np.concatenate(([0], bounds[:-1])), bounds, strict=True)):
            parts[part].append(members[start:stop])
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=int) for p in parts]
