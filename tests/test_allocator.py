"""qat.speed.allocator.retain_freed_memory: glibc serves blocks up to 32 MiB from its heap, and keeps them."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from qat.speed import allocator

glibc_only = pytest.mark.skipif(not allocator._glibc(), reason="glibc's malloc only")
with_mallinfo2 = pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="mallinfo2 needs glibc 2.33")

# Bytes glibc holds in blocks it mapped on their own (mallinfo2's hblkhd), before and after a
# 30 MiB tensor is allocated: such a block is what glibc unmaps when it is freed, so the next
# one takes fresh pages. Then the free bytes the heap holds (fordblks) once the tensor is freed:
# not trimmed, the next step's tensors reuse them. Whether the page faults show up in a given process depends on what it
# allocated before (glibc adapts its thresholds), so the test reads the decision itself.
MAPPED_ON_ITS_OWN = """
import ctypes, sys, torch
from qat.speed import allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    assert allocator.retain_freed_memory()
before = mallinfo2().hblkhd
block = torch.empty(30 << 20, dtype=torch.uint8)
mapped = mallinfo2().hblkhd - before
del block
print(mapped, mallinfo2().fordblks)  # and the free bytes the heap keeps once it is freed
"""


def _mapped_on_its_own(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", MAPPED_ON_ITS_OWN, mode], capture_output=True, text=True, check=True)
    mapped, kept = out.stdout.strip().splitlines()[-1].split()
    return int(mapped), int(kept)


@glibc_only
@with_mallinfo2
def test_blocks_up_to_32_mib_come_from_the_heap_and_stay_there():
    assert _mapped_on_its_own("default")[0] >= 30 << 20  # glibc's default: mapped alone, unmapped when freed
    mapped, kept = _mapped_on_its_own("retain")
    assert mapped == 0 and kept >= 30 << 20


@glibc_only
def test_returns_true_once_set_and_again_after():
    assert allocator.retain_freed_memory() and allocator.retain_freed_memory()


def test_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_retained", False)
    monkeypatch.setattr(allocator, "_glibc", lambda: False)
    assert allocator.retain_freed_memory() is False
