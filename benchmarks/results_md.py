"""benchmarks/RESULTS.md: each benchmark script rewrites its own marked blocks and leaves the rest.

A block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; a missing block is appended.
``RESULTS_MD`` in the environment points the scripts at another copy (gpu.sh writes one under $OUT).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(os.environ.get("RESULTS_MD", Path(__file__).resolve().parent / "RESULTS.md"))


def replace_block(text: str, name: str, lines: list[str]) -> str:
    """``text`` with the block ``name`` holding ``lines`` (appended when absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    if begin in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_block(name: str, lines: list[str]) -> None:
    """Replace the block ``name`` of RESULTS.md with ``lines``."""
    RESULTS.write_text(replace_block(RESULTS.read_text(), name, lines))


def cpu_description() -> str:
    """This CPU as a results block names it: model, the widest integer dot-product instructions
    (what ONNX Runtime's int8 kernels use) and the core count, e.g. ``AMD EPYC, AVX-512 VNNI, 2 cores``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the processor name alone
        pass
    isa = next((name for flag, name in [("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX-512"),
                                        ("avx2", "AVX2")] if flag in flags), None)
    return ", ".join(part for part in (model, isa, f"{os.cpu_count()} cores") if part)
