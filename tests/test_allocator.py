"""qat.retain_freed_memory: glibc keeps freed blocks for reuse instead of taking fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qat
from qat import allocator

glibc_only = pytest.mark.skipif(not allocator._glibc(), reason="glibc's malloc only")

# A step's pattern: three weight-sized temporaries made and freed, then the next step's. The
# count is the fresh pages (minor faults) per round, over the last 20.
FAULTS_PER_ROUND = """
import resource, sys, torch
import qat
if sys.argv[1] == "retain":
    assert qat.retain_freed_memory()
w = torch.randn(512, 512, 3, 3)
def round_():
    a = w * 2.0
    b = a * w
    c = b * w
    return float(c[0, 0, 0, 0])
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round_()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_blocks_are_reused_instead_of_fresh_pages():
    default, retained = _faults_per_round("default"), _faults_per_round("retain")
    # 9 MiB blocks: with glibc's defaults the heap's top is trimmed after each round, and the next
    # round faults its pages in again (2,300 pages of 4 KiB a block)
    assert default > 1000
    assert retained < 10


@glibc_only
def test_returns_true_once_set_and_again_after():
    assert qat.retain_freed_memory() and qat.retain_freed_memory()


def test_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_retained", False)
    monkeypatch.setattr(allocator, "_glibc", lambda: False)
    assert qat.retain_freed_memory() is False
