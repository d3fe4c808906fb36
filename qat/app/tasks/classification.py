"""`ImageClassifier`: the image-classification LightningModule the vision recipes train."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from qat.app.models import create_model
from qat.errors import QATError


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification of any model from :func:`qat.app.models.create_model`.

    Logs ``train_loss``, ``val_loss``, ``val_acc``, ``test_acc`` (top-1, torchmetrics). The optimiser is
    SGD with Nesterov momentum or AdamW; the learning rate follows a cosine over the whole run
    (``trainer.estimated_stepping_batches``), the schedule QAT fine-tuning is usually run with.

    Args:
        model: ``torchvision.<name>`` or ``timm.<name>``.
        num_classes: classes of the head.
        in_chans: input channels.
        pretrained: load the zoo's pretrained weights (online).
        optimizer: ``sgd`` or ``adamw``.
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        model_kwargs: more arguments for :func:`~qat.app.models.create_model`: the zoo's own
            (``{img_size: 32, patch_size: 4}`` for a ViT on small images) or ``bn_momentum``.

    Example::

        module = ImageClassifier("torchvision.resnet18", num_classes=10)
        trainer.fit(module, datamodule=qat.app.data.MNIST5kDataModule(image_size=32, channels=3))
    """

    quality_metric = "test_acc"
    """The headline metric ``qat run`` reports (top-1 accuracy on the test split)."""
    higher_is_better = True

    def __init__(self, model: str = "torchvision.resnet18", num_classes: int = 10, in_chans: int = 3, pretrained: bool = False,
                 optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 5e-4,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise QATError(f"optimizer must be `sgd` or `adamw`; got `{optimizer}`")
        if not lr > 0:
            raise QATError(f"lr must be positive; got `{lr!r}`")
        self.save_hyperparameters()
        self.model: nn.Module = create_model(model, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained,
                                             **(model_kwargs or {}))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        if h.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=0.9, nesterov=True, weight_decay=h.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
