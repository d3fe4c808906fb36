"""`ONNXExport`: write the verified ONNX artifacts and calibration metadata when training ends."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils._pytree import tree_leaves, tree_map
from typing_extensions import override

from qat.errors import QATError
from qat.export.exporter import ARTIFACTS, DEFAULT_RTOL, ExportResult, check_write_target, export_onnx
from qat.lightning.quantization_aware_training import stage_dataloaders
from qat.training.batches import batch_inputs, first_batch, model_inputs, rebatch


def check_on_rank_zero(trainer: pl.Trainer, check: Callable[[], object]) -> None:
    """Run ``check`` on global rank zero (where the files are written) and raise the QATError it
    raises on every rank: every rank stops, none waits for rank zero in vain."""
    problem = None
    if trainer.is_global_zero:
        try:
            check()
        except QATError as error:
            problem = str(error)
    problem = trainer.strategy.broadcast(problem, src=0)
    if problem is not None:
        raise QATError(problem)


def refuse_sharding(trainer: pl.Trainer, callback: str) -> None:
    """Export at the end of ``fit`` needs the whole model in one process; under FSDP2 each rank holds a
    shard, so the export is made from the run's checkpoint instead, which gathers it (``qat export``)."""
    if isinstance(trainer.strategy, ModelParallelStrategy):
        raise QATError(f"{callback} cannot export a model sharded across ranks (ModelParallelStrategy): export from the run's "
                       "checkpoint instead, which gathers the shards in one process: `qat export --checkpoint <checkpoint "
                       "folder or file> ...`, or qat.lightning.load_checkpoint(model, path) and then qat.export_onnx")


class ONNXExport(pl.Callback):
    """Export the trained QAT model at the end of ``fit`` with :func:`qat.export_onnx`.

    Add it after :class:`~qat.lightning.QuantizationAwareTraining`. It writes ``path`` (the
    *device* artifact), ``<stem>.ort.onnx`` and a ``.qparams.json`` sidecar for each, on global
    rank zero, after checking every artifact in ONNX Runtime; a failed verification fails the run
    with the reason and leaves no file behind. The result is kept in :attr:`result`.

    The path is checked when ``fit`` starts (its folder created, a file created and removed there),
    so that a path that cannot be written fails the run before training, not after it.

    Args:
        path: the device artifact's ``.onnx`` path; a relative path is taken inside the
            Trainer's ``default_root_dir`` and may not climb out of it (``../x.onnx``, after
            removing ``a/..`` pairs): a recipe's artifacts stay in its run's folder. An absolute
            path is taken as given.
        example_inputs: the inputs to trace and verify with; default: the LightningModule's
            ``example_input_array``, else the first training batch (without ``labels``).
        artifacts: which artifacts to write (``device``, ``ort``).
        dynamic_batch: leave the batch dimension of the inputs free.
        rtol: allowed ORT vs PyTorch difference, relative to the largest output (embedding models:
            the mean per-row distance, relative to the embedding's length; see :func:`qat.export_onnx`).
        min_top1: for a classifier, the least share of rows on which ORT picks PyTorch's top-1
            class (default ``1 − 2·rtol``; see :func:`qat.export_onnx`).
        verification_inputs: more batches of model inputs (the structure of the example) to
            compare ONNX Runtime with PyTorch on; with a fixed batch size they are re-cut to the
            example's (``qat run`` passes the test split).
        verbose: print the per-artifact parity and kernel report (default: when the Trainer
            shows a progress bar).

    The normalisation the datamodule applies (its ``normalization`` attribute, as the
    :mod:`qat.app.data` modules have) is recorded in the sidecars.

    Example::

        trainer = pl.Trainer(callbacks=[QuantizationAwareTraining(recipe), ONNXExport("model.onnx")])
        trainer.fit(model)
        print(trainer.callbacks[-1].result.ort.kernels)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "model.onnx",
        example_inputs: Any = None,
        artifacts: Sequence[str] = ARTIFACTS,
        dynamic_batch: bool = False,
        rtol: float = DEFAULT_RTOL,
        verification_inputs: Sequence[Any] = (),
        verbose: bool | None = None,
        min_top1: float | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if self.path.suffix != ".onnx":
            raise QATError(f"ONNXExport path `{path}` must end in .onnx")
        if not self.path.is_absolute() and Path(os.path.normpath(self.path)).parts[0] == "..":
            raise QATError(f"ONNXExport path `{path}` climbs out of the run's folder (the Trainer's default_root_dir); give an "
                           "absolute path if that is really meant")
        unknown = [a for a in artifacts if a not in ARTIFACTS]
        if unknown or not artifacts:
            raise QATError(f"ONNXExport artifacts `{list(artifacts)}` must be a non-empty subset of {list(ARTIFACTS)}")
        self.example_inputs, self.artifacts = example_inputs, list(artifacts)
        self.dynamic_batch, self.rtol, self.min_top1 = dynamic_batch, rtol, min_top1
        self.verification_inputs = list(verification_inputs)
        self.verbose = verbose
        self.result: ExportResult | None = None

    def example_inputs_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The inputs the export traces with, on the CPU (see ``example_inputs``)."""
        if self.example_inputs is not None:
            inputs = self.example_inputs
        elif pl_module.example_input_array is not None:
            inputs = pl_module.example_input_array
        else:
            inputs = batch_inputs(first_batch(stage_dataloaders(trainer, "fit")))
        if isinstance(inputs, Mapping):
            inputs = model_inputs(inputs)  # without the targets
        return tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, inputs)

    def target(self, trainer: pl.Trainer) -> Path:
        """Where the device artifact goes: ``path``, inside ``default_root_dir`` when relative; its folder
        is created and checked with :func:`qat.export.exporter.check_write_target`."""
        path = self.path if self.path.is_absolute() else Path(trainer.default_root_dir) / self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise QATError(f"ONNXExport cannot create the folder `{path.parent}` for `{path}`: {error.strerror or error}") from None
        return check_write_target(path, self.artifacts)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharding(trainer, type(self).__name__)
        check_on_rank_zero(trainer, lambda: self.target(trainer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            path = self.target(trainer)
            inputs = self.example_inputs_for(trainer, pl_module)
            extra = self.verification_inputs
            if extra and not self.dynamic_batch:
                extra = rebatch(extra, tree_leaves(inputs)[0].shape[0])
            normalization = getattr(trainer.datamodule, "normalization", None)
            pl_module.cpu()  # ONNX Runtime verifies on the CPU; Lightning moves the model back when it runs again
            self.result = export_onnx(pl_module, inputs, path, artifacts=self.artifacts, verification_inputs=extra,
                                      dynamic_batch=self.dynamic_batch, normalization=normalization, rtol=self.rtol, min_top1=self.min_top1,
                                      verbose=trainer.progress_bar_callback is not None if self.verbose is None else self.verbose)
        trainer.strategy.barrier("qat_onnx_export")
