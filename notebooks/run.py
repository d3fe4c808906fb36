"""Execute the notebooks top to bottom with nbclient; the executed copies (with outputs) go to runs/notebooks/.

The notebooks in git carry no outputs. ``--quick`` sets ``QAT_NOTEBOOK_QUICK=1``, which each
notebook reads to run a few batches per step (what the test suite does); without it they run at
full length (the figures in benchmarks/RESULTS.md).

Run:  python notebooks/run.py [--quick] [--out runs/notebooks] [NAME.ipynb ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def execute(path: Path, out: Path, quick: bool, timeout: int = 1800) -> Path:
    """Run ``path`` in a fresh kernel from the repository root; write the executed copy into ``out``."""
    notebook = nbformat.read(path, as_version=4)
    previous = os.environ.get("QAT_NOTEBOOK_QUICK")
    os.environ["QAT_NOTEBOOK_QUICK"] = "1" if quick else "0"
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE.parent)}}).execute()
    finally:
        if previous is None:
            os.environ.pop("QAT_NOTEBOOK_QUICK")
        else:
            os.environ["QAT_NOTEBOOK_QUICK"] = previous
    out.mkdir(parents=True, exist_ok=True)
    executed = out / path.name
    temporary = executed.with_name(f".{executed.name}.tmp")
    nbformat.write(notebook, temporary)
    temporary.replace(executed)
    return executed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, as in the test suite")
    parser.add_argument("--out", type=Path, default=Path("runs/notebooks"))
    args = parser.parse_args(argv)
    chosen = [HERE / name for name in args.names] or NOTEBOOKS
    for path in chosen:
        if not path.exists():
            sys.exit(f"no notebook `{path}`; the notebooks are {[p.name for p in NOTEBOOKS]}")
        start = time.perf_counter()
        executed = execute(path, args.out, args.quick)
        print(f"{path.name}: ran in {time.perf_counter() - start:.0f} s → {executed}")


if __name__ == "__main__":
    main()
