"""`GenaiFolderExport`: write an onnxruntime-genai folder of the trained LLM when training ends."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from qat.errors import QATError
from qat.export.genai import DEFAULT_RTOL, GenaiExport, GenerationCheck, check_folder, check_generation, export_genai
from qat.lightning.export_callback import check_on_rank_zero, refuse_sharding


class GenaiFolderExport(pl.Callback):
    """Export the trained causal LM at the end of ``fit`` with :func:`qat.export_genai`, then
    generate from it through onnxruntime-genai beside PyTorch.

    Add it after :class:`~qat.lightning.QuantizationAwareTraining`, in place of (or beside)
    :class:`~qat.lightning.ONNXExport`. On global rank zero it writes ``folder`` (inside the
    Trainer's ``default_root_dir`` when relative), verified as :func:`qat.export_genai` verifies,
    and continues each of ``prompts`` greedily through the runtime and in PyTorch
    (:func:`qat.export.genai.check_generation`). The results are kept in :attr:`result` and
    :attr:`generation`. The folder is checked when ``fit`` starts: one that exists and is not
    empty fails the run before training, not after it.

    Args:
        folder: the new folder onnxruntime-genai will load.
        tokenizer: the model's tokenizer (a folder, ``tokenizer.json`` or GGUF file); default the
            datamodule's (a :class:`qat.app.data.TextDataModule` with a pretrained tokenizer).
        context_length: the longest sequence the runtime may generate; default the model's.
        prompts: texts to continue in the generation check (none: no check).
        max_new_tokens: the length of each continuation.
        rtol: the largest logit difference allowed, as a share of the largest PyTorch logit.
        example_ids: the tokens verification runs, ``(batch, length)``; default
            :func:`qat.export_genai`'s.

    Example (a recipe's ``trainer.callbacks``)::

        - class_path: qat.lightning.GenaiFolderExport
          init_args: {folder: smollm2-int4, prompts: ["def fibonacci(n):"]}
    """

    def __init__(self, folder: str | os.PathLike[str] = "genai", tokenizer: str | os.PathLike[str] | None = None,
                 context_length: int | None = None, prompts: Sequence[str] = (), max_new_tokens: int = 32,
                 rtol: float = DEFAULT_RTOL, example_ids: Any = None) -> None:
        super().__init__()
        if max_new_tokens < 1:
            raise QATError(f"GenaiFolderExport max_new_tokens must be ≥ 1; got `{max_new_tokens!r}`")
        self.folder, self.tokenizer, self.context_length = Path(folder), tokenizer, context_length
        self.prompts, self.max_new_tokens, self.rtol, self.example_ids = list(prompts), max_new_tokens, rtol, example_ids
        self.result: GenaiExport | None = None
        self.generation: GenerationCheck | None = None

    def target(self, trainer: pl.Trainer) -> Path:
        """Where the folder goes: ``folder``, inside ``default_root_dir`` when relative."""
        return self.folder if self.folder.is_absolute() else Path(trainer.default_root_dir) / self.folder

    def tokenizer_for(self, trainer: pl.Trainer) -> Any:
        """``tokenizer``, or the file the datamodule's tokenizer was read from."""
        if self.tokenizer is not None:
            return self.tokenizer
        source = getattr(getattr(trainer.datamodule, "tokenizer", None), "source", None)
        if source is None or not Path(source).exists():
            raise QATError("GenaiFolderExport needs the model's tokenizer: set `tokenizer` (a folder, tokenizer.json or GGUF file), "
                           "or train with a datamodule whose tokenizer was read from one")
        return source

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharding(trainer, type(self).__name__)
        check_on_rank_zero(trainer, lambda: self._check_folder(trainer))

    def _check_folder(self, trainer: pl.Trainer) -> None:
        try:
            check_folder(self.target(trainer))
        except QATError as error:
            raise QATError(f"GenaiFolderExport: {error}") from None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            folder = self.target(trainer)
            pl_module.cpu()  # ONNX Runtime verifies on the CPU; Lightning moves the model back when it runs again
            self.result = export_genai(pl_module, folder, tokenizer=self.tokenizer_for(trainer), context_length=self.context_length,
                                       rtol=self.rtol, example_ids=self.example_ids)
            rank_zero_info(f"onnxruntime-genai folder: {self.result}")
            if self.prompts:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # the runtime's own
                prompts = [tokenizer.encode(p, add_special_tokens=False) for p in self.prompts]
                self.generation = check_generation(pl_module, folder, prompts, self.max_new_tokens)
                rank_zero_info(self.generation.describe())
                for prompt, runtime, pytorch in zip(self.prompts, self.generation.runtime, self.generation.pytorch):
                    rank_zero_info(f"  {prompt!r} → runtime {tokenizer.decode(runtime)!r}; PyTorch {tokenizer.decode(pytorch)!r}")
        trainer.strategy.barrier("qat_genai_export")
