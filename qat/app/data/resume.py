"""Training loaders that resume where a checkpoint left them, even in the middle of an epoch.

A killed run resumed from its last checkpoint must see the batches the uninterrupted run would
have seen. Two things make that work for the shipped DataModules:

- :class:`ResumableShuffle`: the order of epoch ``e`` is a function of ``(seed, e)`` alone, not of
  a generator's history, and an iteration can start part-way into it;
- :class:`ResumableDataModule`: its ``state_dict`` — which Lightning stores in every checkpoint and
  hands back through ``load_state_dict`` before it builds the loaders — records the epoch and the
  number of its batches that training has consumed.

The position comes from the fit loop's progress counters, not from the loader, which runs ahead
of training (Lightning prefetches a batch, worker processes more). And it travels in the
DataModule's state, not the loader's: Lightning restores a loader's own ``load_state_dict`` only
into a loader it builds after the restore, and a ``configure_optimizers`` that reads
``trainer.estimated_stepping_batches`` (as the learning-rate schedules of ``qat.app.tasks`` do) has it
built before, so that state would be dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import RandomSampler


def seeded_generator(*numbers: int) -> torch.Generator:
    """A torch generator seeded from all of ``numbers`` (epoch 1 of seed 0 is not epoch 0 of seed 1)
    through NumPy's SeedSequence, whose output NumPy keeps stable across releases."""
    state = np.random.SeedSequence([n % 2**64 for n in numbers]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class ResumableShuffle(RandomSampler):
    """A seeded shuffle whose order in epoch ``e`` depends only on ``(seed, e)``.

    Each iteration walks the order of :attr:`epoch` from sample :attr:`start`, then moves to the next
    epoch, so a plain loop reshuffles every epoch; Lightning also sets the epoch itself
    (``set_epoch``, before every epoch). A subclass of ``RandomSampler``, so that under DDP Lightning
    swaps it for its ``DistributedSampler`` as it does for ``shuffle=True``.

    Example:
        >>> sampler = ResumableShuffle(range(6), seed=0)
        >>> first = list(sampler)
        >>> sampler.epoch, sorted(first)
        (1, [0, 1, 2, 3, 4, 5])
        >>> sampler.set_epoch(0)
        >>> sampler.start = 4
        >>> list(sampler) == first[4:]
        True
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch, self.start = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        order = torch.randperm(len(self.data_source), generator=seeded_generator(self.seed, epoch))
        yield from order[start:].tolist()


def training_position(trainer: pl.Trainer) -> tuple[int, int]:
    """``(epoch, batches of it that training has consumed)`` as the fit loop counts them, the epoch
    moved on when all its batches are done (the checkpoint of the last step of an epoch, or one
    saved at its end)."""
    loop = trainer.fit_loop
    epoch = loop.epoch_progress.current
    if epoch.started <= epoch.completed:  # between epochs (e.g. ``save_checkpoint`` after fit)
        return epoch.completed, 0
    batches = loop.epoch_loop.batch_progress.current.processed
    if batches >= trainer.num_training_batches:
        return epoch.completed + 1, 0
    return epoch.completed, batches


class ResumableDataModule(pl.LightningDataModule):
    """A DataModule whose training loader continues, after a resume, with the batch the checkpointed
    run would have trained on next: build it with :meth:`train_sampler`.

    Restored: the shuffle order and the position in it. Not restored (Lightning keeps neither): the
    global random state (dropout, the random draws of your own transforms) and the state of worker
    processes. Under DDP Lightning replaces the sampler with a ``DistributedSampler``, which restarts
    the epoch.
    """

    batch_size: int
    seed: int
    _resume_at: tuple[pl.Trainer | None, int, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: where training is in the shuffled training data."""
        trainer = self.trainer
        if trainer is None or trainer.num_training_batches == float("inf"):
            return {}
        epoch, batches = training_position(trainer)
        return {"train_epoch": epoch, "train_batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning with a checkpoint's state, before it builds the loaders."""
        self._resume_at = (self.trainer, int(state_dict.get("train_epoch", 0)), int(state_dict.get("train_batches", 0)))

    def train_sampler(self, dataset: Sized) -> ResumableShuffle:
        """The training shuffle at the start of the trainer's current epoch, or at the position a
        checkpoint restored while the trainer that restored it has not gone past that epoch.

        Every loader built in that window starts there: Lightning may build it before it restores
        the loop counters (for ``estimated_stepping_batches``), a callback may build one to peek at a
        batch, and ``reload_dataloaders_every_n_epochs`` builds one per epoch.
        """
        sampler = ResumableShuffle(dataset, self.seed)
        sampler.epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self._resume_at is not None:
            trainer, epoch, batches = self._resume_at
            if trainer is self.trainer and sampler.epoch <= epoch:
                sampler.epoch, sampler.start = epoch, batches * self.batch_size
        return sampler
