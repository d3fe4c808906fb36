"""benchmarks/RESULTS.md: each benchmark script rewrites its own marked blocks and leaves the rest.

A block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; a missing block is appended.
``RESULTS_MD`` in the environment points the scripts at another copy (gpu.sh writes one under $OUT).
"""

from __future__ import annotations

import os
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
