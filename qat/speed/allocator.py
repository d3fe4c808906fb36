"""Keep freed CPU memory in the process for the next training step (glibc's ``malloc``).

A training step frees and allocates tensors of the same sizes every step. By default glibc's
``malloc`` gives large freed blocks back to the system: a block of 128 KiB and more (the
threshold rises with the blocks freed, up to 32 MiB) is unmapped when freed, and free memory at
the top of the heap is trimmed. The next step's tensors then take fresh pages, which the kernel
maps and zeroes 4 KiB at a time. A float step mostly reuses what it freed; a QAT step makes
weight-sized temporaries (folded and fake-quantized weights, masks, their gradients), which then
cost page faults every step (benchmarks/RESULTS.md counts them).

:func:`retain_freed_memory` sets two of glibc's ``mallopt`` parameters for the rest of the
process: blocks up to 32 MiB (the largest ``M_MMAP_THRESHOLD`` glibc accepts on 64-bit) come from
the heap, and up to 1 GiB free at its top (``M_TRIM_THRESHOLD``) stays mapped. That is the policy
PyTorch's CPU launcher (``python -m torch.backends.xeon.run_cpu``) gets by preloading jemalloc or
tcmalloc; a callback cannot relaunch the process it runs in, so it sets glibc's own. The cost is
memory the process keeps between steps: what a step freed stays mapped until the next one uses it
again, so the resident size stays at the step's peak. Blocks above 32 MiB are unmapped as before.
Elsewhere than glibc (macOS, Windows, musl) it does nothing and returns False.

Opt-in: importing ``qat`` or adding the Lightning callback leaves the process allocator as it
is. The callback calls it when it trains on the CPU with ``retain_freed_memory=True``; a plain
PyTorch loop calls it once before training.

Example:
    >>> from qat.speed.allocator import retain_freed_memory
    >>> retain_freed_memory()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Requests below this come from the heap (glibc's maximum on 64-bit: ``4 MiB * sizeof(long)``)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap that stays mapped."""

_retained = False


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (not glibc)
        return False


def retain_freed_memory() -> bool:
    """Tell glibc's ``malloc`` to keep freed blocks up to 32 MiB for reuse, for the rest of the
    process; True when it took effect (or already had), False where ``malloc`` is not glibc's."""
    global _retained
    if _retained:
        return True
    if not _glibc():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; 0 for a value it refuses (32-bit glibc caps the threshold lower)
    _retained = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _retained
