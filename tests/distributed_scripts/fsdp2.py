"""2 CPU ranks (gloo) train a prepared MLP under FSDP2 (qat.training.sharding.fully_shard_prepared);
each rank saves its losses, its quantizer state after every step and the final full weights.

Run by tests/test_sharding.py:  python fsdp2.py <output folder> <port>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_sharding import batches, build, quantizer_state

import qat
from qat.errors import QATError
from qat.training.sharding import check_sharding, fully_shard_prepared


def tensor_parallel_refused(world: int) -> str:
    """What check_sharding says of a prepared model whose first layer is split column-wise across the ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(16, 32)), {"weight": {"bits": 4}})
    parallelize_module(model, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel()})
    try:
        check_sharding(model)
    except QATError as error:
        return str(error)
    return ""


def run(rank: int, world: int, folder: Path, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build()
    calibration, steps = batches()
    qat.calibrate(model, [calibration.chunk(world)[rank]], progress=False)
    fully_shard_prepared(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, states = [], []
    for x, y in steps:
        loss = torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        states.append(quantizer_state(model))
    weights = {name: p.full_tensor().detach() for name, p in model.named_parameters() if hasattr(p, "full_tensor")}
    torch.save({"losses": losses, "states": states, "weights": weights, "tensor_parallel": tensor_parallel_refused(world)},
               folder / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(2, Path(sys.argv[1]), sys.argv[2]), nprocs=2)
