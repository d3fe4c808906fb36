"""QAT under FSDP2 on the CPU: per-rank step time and peak memory of a QAT step against the float step.

Two processes (gloo), one thread each, train the same model sharded with ``fully_shard`` in the same
layout: each Linear and Embedding a unit of its own, then the whole model. ``float`` is the model
as it is; ``lightning-qat`` is ``qat.prepare`` with the recipe of ``benchmarks/overhead.py``'s
workload, in its QAT phase as there (observers and fake quantization on; a recipe with learned
scales calibrated once, then observers off), sharded by
``qat.training.sharding.fully_shard_prepared``. Each rank takes half of the global batch. Both
variants live in each process and take turns (``--rounds`` rounds of ``--steps`` steps), so a
noisy machine slows both alike; the figure is the median step time on rank 0, whose ranks wait
for each other at every collective.

Memory: the peak of one step on each rank (forward, backward, optimizer step, the all-gathered
units included), plus what the rank holds before it (its shards of the parameters, the
optimizer's state, buffers, the replicated quantizer state), counted as ``overhead.py`` counts
it on the CPU (:class:`overhead.LiveTensorBytes`); the larger of the two ranks.

    python benchmarks/fsdp2.py                 # Llama 4 × 256, sequence 128, global batch 8
    python benchmarks/fsdp2.py --write         # and replace the `fsdp2` table of RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from overhead import LiveTensorBytes, workload
from results_md import cpu_description, write_block
from torch import nn

import qat
from qat.training.sharding import fully_shard_prepared, tied_units

WORLD = 2


def shard_like_qat(model: nn.Module) -> nn.Module:
    """``fully_shard`` on each Linear and Embedding (a tied pair together), then on the model: the units
    fully_shard_prepared makes."""
    from torch.distributed.fsdp import fully_shard

    for unit in tied_units([m for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding)]):
        fully_shard(unit if len(unit) > 1 else unit[0])
    return fully_shard(model)


class Variant:
    def __init__(self, model: nn.Module, work, rank: int) -> None:
        self.model = model.train()
        self.optimizer = work.optimizer(list(model.parameters()))
        self.batch = tuple(t.chunk(WORLD)[rank] for t in work.batch)
        self.loss = work.loss

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(self.model, self.batch).backward()
        self.optimizer.step()

    def timed(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return times

    def peak_bytes(self) -> int:
        """What this rank holds before a step (its shards, optimizer state, buffers) plus the step's peak."""
        self.optimizer.zero_grad(set_to_none=True)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        state = [*local, *self.model.buffers()]
        state += [t.to_local() if hasattr(t, "to_local") else t
                  for per_param in self.optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
        own = sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in state}.values())
        with LiveTensorBytes([*state, *self.batch]) as live:
            self.step()
        return own + live.peak


def run(rank: int, folder: str, port: str, model_name: str, rounds: int, steps: int, warmup: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    work = workload(model_name, "cpu")
    float_model = shard_like_qat(copy.deepcopy(work.model))
    prepared = qat.prepare(copy.deepcopy(work.model), work.recipe)  # observers and fake quantization on: the QAT phase
    if work.calibrated:  # as overhead.py: calibrated once, observers off, the scales learned from there
        qat.calibrate(prepared, [work.batch[0][:2, :16]], progress=False)
        qat.set_observers(prepared, False)
    variants = {"float": Variant(float_model, work, rank), "lightning-qat": Variant(fully_shard_prepared(prepared), work, rank)}
    for variant in variants.values():
        for _ in range(warmup):
            variant.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            times[name] += variant.timed(steps)
    peaks = {name: variant.peak_bytes() for name, variant in variants.items()}
    torch.save({"times": times, "peaks": peaks, "description": work.description}, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", choices=["llama", "smollm2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="replace the `fsdp2` table of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(run, args=(folder, _free_port(), args.model, args.rounds, args.steps, args.warmup), nprocs=WORLD)
        ranks = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    times = {name: statistics.median(values) for name, values in ranks[0]["times"].items()}
    peaks = {name: max(rank["peaks"][name] for rank in ranks) for name in times}
    lines = [f"{ranks[0]['description']}; {WORLD} ranks (gloo), 1 thread each, each rank half the batch. "
             f"`python benchmarks/fsdp2.py {shlex.join(argv if argv is not None else sys.argv[1:])}`, "
             f"{cpu_description()}, torch {torch.__version__.split('+')[0]}, {datetime.date.today()}.", "",
             "| variant | step (ms, median) | × float | peak memory per rank (MB) | × float |", "|---|---|---|---|---|"]
    for name in times:
        lines.append(f"| {name} | {times[name] * 1e3:.1f} | {times[name] / times['float']:.2f}× | {peaks[name] / 2**20:.1f} | "
                     f"{peaks[name] / peaks['float']:.2f}× |")
    print("\n".join(lines))
    if args.write:
        write_block(f"fsdp2:{args.model}", lines)


if __name__ == "__main__":
    main()
