"""QAT-vs-float step-time ratios of this checkout against another commit's, from one command.

A refactor must not slow training down: this runs ``benchmarks/overhead.py`` from this checkout
and from ``--base`` (a git worktree made in a temporary folder), alternating ``--repeats`` times,
and compares the ``× float`` ratios. Each ratio is measured inside one process (QAT and float
steps interleaved), so a noisy machine slows both sides of a ratio alike; alternating the two
commits spreads what noise remains over both.

Run:  python benchmarks/versus_commit.py --base 423ce17 [--repeats 2] [--rounds 12] [--write]
``--write`` replaces the ``versus-commit`` block of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_md import cpu_description, write_block

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["lightning-qat"]


def run_overhead(tree: Path, models: list[str], rounds: int) -> dict[tuple[str, str], float]:
    """``(model, variant) → × float`` from one run of ``tree``'s overhead benchmark."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "benchmarks/overhead.py", "--models", *models, "--variants", *VARIANTS, "--rounds", str(rounds)]
    out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
    ratios = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[3].endswith("×") and cells[1] != "float":
            ratios[(cells[0], cells[1])] = float(cells[3].rstrip("×"))
    if not ratios:
        raise SystemExit(f"no ratios in the output of {' '.join(command)} in {tree}:\n{out}")
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare against, e.g. the one before a refactor")
    parser.add_argument("--models", nargs="+", default=["resnet18", "llama"])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--rounds", type=int, default=12, help="overhead.py's --rounds per run")
    parser.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True, capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"base": [], "this": []}
            for repeat in range(args.repeats):
                for side, tree in (("base", base_tree), ("this", ROOT)):
                    print(f"run {repeat + 1}/{args.repeats}: {side}", flush=True)
                    runs[side].append(run_overhead(tree, args.models, args.rounds))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout:
        head += " + uncommitted changes"
    lines = [f"| model | variant | × float at {args.base} | × float at {head} (this) | change |", "|---|---|---|---|---|"]
    for key in runs["base"][0]:
        base = statistics.median(r[key] for r in runs["base"] if key in r)
        this = statistics.median(r[key] for r in runs["this"] if key in r)
        lines.append(f"| {key[0]} | {key[1]} | {base:.2f}× | {this:.2f}× | {(this / base - 1) * 100:+.1f} % |")
    footer = (f"Command: `python benchmarks/versus_commit.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
              f"{cpu_description()}; median over {args.repeats} alternating runs per commit of overhead.py "
              f"--rounds {args.rounds}; {datetime.date.today():%Y-%m-%d}.")
    print("\n".join([*lines, "", footer]))
    if args.write:
        write_block("versus-commit", [*lines, "", footer])


if __name__ == "__main__":
    main()
