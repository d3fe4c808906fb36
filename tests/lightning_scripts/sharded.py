"""Train the tiny Llama and CNN under FSDP2 (ModelParallelStrategy, 2 CPU ranks, gloo) with the QAT
callback. Lightning re-runs this script for rank 1.

    python sharded.py fit OUT      3 epochs (6 steps); every rank saves its quantizer state and loss after
                                 every step, rank 0 the whole final state; a checkpoint after every epoch
                                 (the Llama's sharded, the CNN's one full file)
    python sharded.py resume OUT   the same runs resumed from the epoch-2 checkpoints in new processes

See tests/test_lightning_fsdp2.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_models import CNN_RECIPE, LLAMA_RECIPE, LitClassifier, LitLlama, trainer
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.utils.data import DataLoader, DistributedSampler

from qat.lightning import QuantizationAwareTraining
from qat.training.sharding import fully_shard_prepared

SCHEDULE = {"calibrate_from": 1, "fake_quant_from": 2, "freeze_bn_at": 4}
"""In optimizer steps, 2 per epoch: BatchNorm statistics train for the first 4 steps."""


class Sharded:
    """FSDP2 over the quantized layers; each rank reads every other sample, in order, so that one step of the
    two ranks reads the samples one process reads in one step at twice the batch size."""

    def configure_model(self) -> None:
        fully_shard_prepared(self.model, mesh=self.device_mesh["data_parallel"])

    def train_dataloader(self) -> DataLoader:
        dataset = super().train_dataloader().dataset
        return DataLoader(dataset, self.batch_size, sampler=DistributedSampler(dataset, 2, self.global_rank, shuffle=False))


class ShardedLlama(Sharded, LitLlama):
    pass


class ShardedCNN(Sharded, LitClassifier):
    pass


AFFINE = {"weight": {"symmetric": False}, "activation": {"symmetric": False}}
"""For the Llama compared with one process. On a symmetric grid the largest positive value of each group or token
lands exactly on a rounding tie (``(qmax - qmin) / 2`` steps), where the float noise between two runs that sum their
gradients in another order flips its straight-through mask: the runs then part by a whole step of that value. An
affine grid puts both ends on whole codes."""


def affine(recipe: dict) -> dict:
    return {**recipe, **{role: {**recipe.get(role, {}), **AFFINE[role]} for role in AFFINE}}


SGD = {"optimizer": "sgd", "lr": 0.5}
"""The Llama compared with one process trains with SGD: AdamW divides each gradient by the root of its running square,
so an element whose gradient is near zero would step by up to the learning rate in a direction float noise sets."""

RUNS = {  # module, its arguments, recipe, schedule, sharded checkpoint (else one full file), Trainer options
    "llama": (ShardedLlama, {}, LLAMA_RECIPE, SCHEDULE, True, {}),
    "cnn": (ShardedCNN, {}, CNN_RECIPE, SCHEDULE, False, {}),
    # two micro-batches a step: the fake-quantized weights are made again for each (no reuse under FSDP2)
    "llama-accumulate": (ShardedLlama, {}, LLAMA_RECIPE, SCHEDULE, True, {"accumulate_grad_batches": 2}),
    "llama-affine": (ShardedLlama, SGD, affine(LLAMA_RECIPE), SCHEDULE, True, {}),
    # BatchNorm statistics frozen from the start, so each rank's share of the batch is normalised as the whole batch is:
    "cnn-frozen-bn": (ShardedCNN, {}, CNN_RECIPE, {**SCHEDULE, "freeze_bn_at": 0}, False, {}),
}
RESUMED = ("llama", "cnn")


def replicated_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors every rank holds whole: quantizer state (scales, zero points, ranges) and BatchNorm statistics."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor) and ("quantizer." in k or k.endswith(("running_mean", "running_var")))}


class Recorder(Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(replicated_state(pl_module))
        self.losses.append(outputs["loss"].detach().clone())


def run(kind: str, folder: Path, ckpt_path: str | None = None) -> None:
    module_cls, arguments, recipe, schedule, sharded_checkpoint, options = RUNS[kind]
    pl.seed_everything(0, verbose=False)
    module = module_cls(**arguments)
    recorder = Recorder()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoint)
    checkpoints = ModelCheckpoint(dirpath=folder / kind, every_n_epochs=1, save_top_k=-1)
    fit = trainer(strategy=strategy, devices=2, max_epochs=3, limit_val_batches=1, enable_checkpointing=True, use_distributed_sampler=False,
                  callbacks=[QuantizationAwareTraining(recipe, schedule=schedule, print_summary=False), recorder, checkpoints],
                  **options)
    fit.fit(module, ckpt_path=ckpt_path)
    # collective: the whole model and optimizer state, on rank 0
    model, optimizer = get_state_dict(fit.strategy.model, fit.optimizers[0],
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save({"states": recorder.states, "losses": recorder.losses}, folder / f"{kind}-rank{fit.global_rank}.pt")
    if fit.global_rank == 0:
        torch.save({"model": model, "optimizer": optimizer}, folder / f"{kind}-final.pt")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "fit":
        for kind in RUNS:
            run(kind, out)
    else:
        for kind in RESUMED:
            run(kind, out / "resumed", ckpt_path=str(next((out / kind).glob("epoch=1-*"))))
