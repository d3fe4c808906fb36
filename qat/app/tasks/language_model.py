"""`CausalLanguageModel`: next-token training of a Hugging Face causal LM, the module the LLM recipes train.

Also home of :func:`hf_model` (a transformers model from a config mapping, a local folder, a GGUF
file or the name of a packaged model), :func:`save_hf_folder` (such a model back as a plain folder) and
:func:`warmup_cosine` (the learning-rate shape both text tasks use), shared with
:mod:`qat.app.tasks.distillation`.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from qat.app.models import resolve_model
from qat.atomic import check_new_folder, new_folder
from qat.errors import QATError
from qat.export.genai_graph import causal_lm
from qat.tokenizer_files import load_hf_tokenizer
from qat.training.control import quantizers

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
"""Attention kernels that trace with ``torch.onnx.export(dynamo=True)``: both lower to plain
MatMul/Softmax (flash-attention and flex-attention kernels do not export)."""

IGNORE_INDEX = -100
"""The label value Hugging Face losses skip (padding)."""

def hf_model(model: str | os.PathLike[str] | Mapping[str, Any], auto_class: Any, attn_implementation: str = "sdpa",
             configure: Callable[[Any], None] | None = None, argument: str = "model") -> nn.Module:
    """A transformers model from a config mapping (random init), a local folder or GGUF file, or a
    packaged model's name (:data:`PACKAGED`, pretrained weights).

    A mapping needs ``model_type`` and is read by ``AutoConfig.for_model``; the weights are drawn
    from torch's global generator, so ``lightning.seed_everything`` makes them reproducible. A
    string is a folder with ``config.json`` and weights (or a Hub id already in the local cache),
    or a ``.gguf`` file, which transformers de-quantizes to float (it needs the ``gguf`` extra):
    nothing is downloaded. Weights load in float32 whatever the checkpoint's dtype: QAT keeps float
    master weights and lets the Trainer's ``precision`` pick the compute dtype.

    Args:
        model: the config mapping, or the folder.
        auto_class: ``transformers.AutoModelForCausalLM``, ``transformers.AutoModel``…
        attn_implementation: ``sdpa`` or ``eager`` (both export to ONNX).
        configure: called with the config before the model is built (layers read it once, at
            construction: e.g. to turn dropout off).
        argument: the caller's argument name, for error messages.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> lm = hf_model({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        ...                "num_attention_heads": 2, "vocab_size": 64}, AutoModelForCausalLM)
        >>> type(lm).__name__, lm.config._attn_implementation
        ('LlamaForCausalLM', 'sdpa')
    """
    from transformers import AutoConfig

    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise QATError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)} (they export to ONNX); "
                       f"got `{attn_implementation}`")
    if isinstance(model, Mapping):
        options = dict(model)
        model_type = options.pop("model_type", None)
        if not isinstance(model_type, str):
            raise QATError(f"{argument}: a config mapping needs `model_type` (e.g. `llama`, `bert`); got keys {sorted(model)}")
        try:
            config = AutoConfig.for_model(model_type, **options)
        except ValueError as error:
            raise QATError(f"{argument}: model_type `{model_type}` is not a transformers model type "
                           "(transformers.CONFIG_MAPPING lists them)") from error
        if configure is not None:
            configure(config)
        try:
            return auto_class.from_config(config, attn_implementation=attn_implementation)
        except ValueError as error:
            raise QATError(f"{argument}: cannot build a {auto_class.__name__} from model_type `{model_type}`: {error}") from error
    if not isinstance(model, str | os.PathLike):
        raise QATError(f"{argument} must be a folder, a GGUF file or a config mapping; got `{model!r}`")
    model = resolve_model(model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return _gguf_model(path, auto_class, attn_implementation, configure, argument)
    if path.exists() and not (path / "config.json").is_file():
        raise QATError(f"{argument}: `{model}` has no config.json; pass a folder saved by save_pretrained()")
    source = str(path) if path.exists() else str(model)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        if configure is not None:
            configure(config)
        return auto_class.from_pretrained(source, config=config, local_files_only=True, attn_implementation=attn_implementation,
                                          dtype=torch.float32)
    except (OSError, ValueError) as error:
        hint = "" if path.exists() else (" (no such folder, and not in the Hugging Face cache: download it first, e.g. "
                                         "`hf download <id> --local-dir <folder>`, and pass the folder)")
        raise QATError(f"{argument}: cannot load `{model}`{hint}: {str(error).splitlines()[0]}") from error



def _gguf_model(path: Path, auto_class: Any, attn_implementation: str, configure: Callable[[Any], None] | None,
                argument: str) -> nn.Module:
    """A GGUF file's model, de-quantized to float32 by transformers (``from_pretrained(gguf_file=)``)."""
    from transformers import AutoConfig

    if not path.is_file():
        raise QATError(f"{argument}: GGUF file `{path}` does not exist")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise QATError(f"{argument}: reading `{path.name}` needs {' and '.join(missing)}: pip install 'lightning-qat[gguf]'")
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        if configure is not None:
            configure(config)
        return auto_class.from_pretrained(path.parent, gguf_file=path.name, config=config, local_files_only=True,
                                          attn_implementation=attn_implementation, dtype=torch.float32)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, struct.error) as error:  # what a damaged file raises in gguf's reader
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise QATError(f"{argument}: transformers cannot read GGUF file `{path}`: {lines[0]}") from error


def save_hf_folder(model: nn.Module, folder: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None) -> Path:
    """Save a float causal LM (a ``…ForCausalLM``, or a module holding one) and its tokenizer
    as a plain Hugging Face folder that other tools load, e.g. onnxruntime-genai's model builder.

    ``save_pretrained`` refuses a model loaded from a GGUF file (its config keeps the file's
    ``quantization_config`` though the weights are de-quantized floats), so the weights go into a
    fresh model of the same class built from the config without it. ``tokenizer``: a
    ``tokenizer.json``, a folder or a GGUF file (:func:`qat.tokenizer_files.load_hf_tokenizer`).

    Example::

        save_hf_folder(hf_model("smollm2-135m-instruct", AutoModelForCausalLM), "smollm2-hf", tokenizer="smollm2-135m-instruct")
    """
    lm, folder = causal_lm(model), Path(folder)
    check_new_folder(folder, "save_hf_folder")
    hf_tokenizer = None if tokenizer is None else load_hf_tokenizer(Path(resolve_model(str(tokenizer))))
    config = copy.deepcopy(lm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(lm)(config)
    fresh.load_state_dict(lm.state_dict())
    with new_folder(folder, "save_hf_folder") as work:
        fresh.save_pretrained(work)
        if hf_tokenizer is not None:
            hf_tokenizer.save_pretrained(work)
    return folder


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then a cosine down to ``min_lr_ratio`` × the peak
    at ``total_steps`` (the GPT-3 / Chinchilla shape); stepped once per optimizer step.

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> schedule = warmup_cosine(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
        >>> [round(schedule.lr_lambdas[0](s), 3) for s in (0, 1, 2, 6, 10, 20)]
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps(trainer: pl.Trainer) -> int:
    """The run's optimizer steps, for the schedule; an endless run has no schedule length."""
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise QATError("the learning-rate schedule needs the run's length: set the Trainer's max_steps or max_epochs")
    return max(1, int(steps))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (Linear, Embedding weights) only, as in GPT-2 and
    nanoGPT; never on biases, norms or the quantizers' learnable scales and zero points (decay
    would shrink the quantization grid towards zero)."""
    quant = {id(p) for _, q in quantizers(module) for p in q.parameters()}
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in quant else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_optimizer_arguments(lr: float, weight_decay: float, warmup_steps: int | None, min_lr_ratio: float) -> None:
    if not lr > 0:
        raise QATError(f"lr must be positive; got `{lr!r}`")
    if not weight_decay >= 0:
        raise QATError(f"weight_decay must be ≥ 0; got `{weight_decay!r}`")
    if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0):
        raise QATError(f"warmup_steps must be an integer ≥ 0 or None (5 % of the run); got `{warmup_steps!r}`")
    if not 0 <= min_lr_ratio <= 1:
        raise QATError(f"min_lr_ratio must be in [0, 1]; got `{min_lr_ratio!r}`")


class TokenPerplexity(MeanMetric):
    """exp of the token-weighted mean cross-entropy over everything seen: the split's perplexity.

    ``update(mean_loss, tokens)`` takes one batch's mean loss and its number of predicted tokens,
    so batches of different sizes and padding count by their tokens, not equally (the mean of
    per-batch perplexities would overweight short batches and, by Jensen, overstate the figure).
    Cheaper than ``torchmetrics.text.Perplexity``, which recomputes a log-softmax over the whole
    vocabulary from the logits; the sums are reduced across ranks like any ``MeanMetric``.

    Example:
        >>> ppl = TokenPerplexity()
        >>> ppl.update(torch.tensor(1.0), 3); ppl.update(torch.tensor(2.0), 1)
        >>> round(float(ppl.compute()), 4) == round(math.exp((3 * 1.0 + 2.0) / 4), 4)
        True
    """

    def compute(self) -> Tensor:
        return super().compute().exp()


class CausalLanguageModel(pl.LightningModule):
    """Next-token cross-entropy training of a Hugging Face causal LM, ready for QAT and ONNX export.

    The model comes from a config mapping (random init: small LMs trained here, tests) or a local
    folder (a pretrained checkpoint to fine-tune with QAT). Batches are dicts of ``input_ids``,
    ``attention_mask`` and optionally ``labels`` (default: ``input_ids`` with padding set to
    -100; the model shifts them). The loss is the model's own token-mean cross-entropy.

    Logs ``train_loss`` (progress bar), ``val_loss``, ``val_ppl`` and ``test_ppl``: the perplexity
    of the whole split, exp of the token-weighted mean cross-entropy (:class:`TokenPerplexity`).

    ``forward(input_ids, attention_mask)`` returns the logits tensor (batch, sequence, vocabulary),
    computed without a KV cache, so :func:`qat.export_onnx` and :class:`qat.lightning.ONNXExport`
    trace this module directly with ``{"input_ids": …, "attention_mask": …}``.

    The optimiser is AdamW (betas 0.9/0.95, decay on matrices only), with a linear warmup and a
    cosine down to ``min_lr_ratio`` of the peak over ``trainer.estimated_stepping_batches``.

    Args:
        model: a config mapping with ``model_type`` (``AutoConfig.for_model``), or a folder with
            ``config.json`` and weights.
        lr: peak learning rate (3e-4 suits training a small model from scratch; fine-tuning a
            pretrained LLM with QAT wants about 1e-5 and weight_decay 0).
        weight_decay: AdamW's decoupled weight decay on weight matrices.
        warmup_steps: linear warmup steps; None: 5 % of the run.
        min_lr_ratio: the learning rate at the end, as a fraction of ``lr``.
        attn_implementation: ``sdpa`` or ``eager`` (both export to ONNX).

    Example::

        module = CausalLanguageModel({"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                                      "vocab_size": 512, "max_position_embeddings": 256})
        trainer = pl.Trainer(max_steps=500, callbacks=[QuantizationAwareTraining(recipe), ONNXExport("lm.onnx")])
        trainer.fit(module, datamodule=text_data)
    """

    quality_metric = "test_ppl"
    higher_is_better = False
    returns_logits = True
    """``forward`` returns next-token logits: the export's parity check reports perplexity in ONNX Runtime."""

    def __init__(self, model: str | dict[str, Any], lr: float = 3e-4, weight_decay: float = 0.1, warmup_steps: int | None = None,
                 min_lr_ratio: float = 0.1, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        check_optimizer_arguments(lr, weight_decay, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM

        # train mode, as a LightningModule starts: from_pretrained returns a model in eval mode
        self.model: nn.Module = hf_model(model, AutoModelForCausalLM, attn_implementation).train()
        self.val_ppl = TokenPerplexity()
        self.test_ppl = TokenPerplexity()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The model's mean loss and the number of tokens it averaged over."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        return loss, (labels[:, 1:] != IGNORE_INDEX).sum()  # the model predicts token t+1 from tokens ≤ t

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        if tokens > 0:  # an all-padding batch has a NaN mean loss and no weight
            self.val_ppl.update(loss, tokens)
            self.log("val_loss", loss, batch_size=int(tokens))  # token-weighted like val_ppl: val_loss = ln(val_ppl)
        self.log("val_ppl", self.val_ppl, prog_bar=True)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        if tokens > 0:
            self.test_ppl.update(loss, tokens)
        self.log("test_ppl", self.test_ppl)

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"))

    def configure_optimizers(self) -> Any:
        h = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self, h.weight_decay), lr=h.lr, betas=(0.9, 0.95))
        steps = total_steps(self.trainer)
        warmup = int(0.05 * steps) if h.warmup_steps is None else h.warmup_steps
        schedule = warmup_cosine(optimizer, steps, warmup, h.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
