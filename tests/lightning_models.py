"""Tiny LightningModules and data for the callback tests: a CNN classifier and a Hugging Face Llama.

Both are deterministic (fixed data, no shuffling, no dropout), so two runs with the same seed
reach bit-identical weights on the CPU. The Llama module calls the HF model with keyword
arguments, as real HF training code does.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from tiny_models import TinyCNN
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

CNN_RECIPE = {"weight": {"bits": 4}, "rules": [{"names": "model.fc2", "activation": {"learnable": True}}]}
"""int4 per-channel weights, uint8 activations, one learnable (LSQ+) input scale."""
LLAMA_RECIPE = {
    "weight": {"bits": 4, "granularity": "per_group", "group_size": 16},
    "activation": {"granularity": "per_token", "signed": True, "symmetric": True},
}
"""W4 per-group weights with dynamic int8 per-token activations: the LLM recipe."""


def image_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """8×8 RGB images; the class is the brightest quadrant of channel 0 (learnable by TinyCNN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    quadrants = x[:, 0].unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2)).flatten(1)  # (n, 4)
    return TensorDataset(x, quadrants.argmax(1))


class TokenData(Dataset):
    """Token sequences that count up modulo the vocabulary from a random start: next-token predictable."""

    def __init__(self, n: int = 32, length: int = 16, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


class LitClassifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05, batch_size: int = 16) -> None:
        super().__init__()
        self.model = TinyCNN(classes=4)
        self.lr, self.batch_size = lr, batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log_dict({"val_loss": loss, "val_acc": acc})

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log_dict({"test_loss": loss, "test_acc": acc})

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(image_data(64, seed=0), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(image_data(32, seed=1), batch_size=self.batch_size)

    test_dataloader = val_dataloader

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(image_data(16, seed=2), batch_size=self.batch_size)


class DigitsClassifier(LitClassifier):
    """TinyCNN over the 10 classes of ``qat.app.data.DigitsDataModule(channels=3)`` (8×8), trained like
    ``qat.app.tasks.ImageClassifier``: a cosine over ``trainer.estimated_stepping_batches``, which makes
    Lightning build the training loader before it restores a checkpoint's loop state."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.model = TinyCNN(classes=10)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class LitLlama(pl.LightningModule):
    def __init__(self, lr: float = 3e-3, batch_size: int = 8, heads: int = 4, optimizer: str = "adamw") -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
                             num_key_value_heads=heads // 2, max_position_embeddings=64)
        self.model = LlamaForCausalLM(config)
        self.lr, self.batch_size, self.optimizer = lr, batch_size, optimizer

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def configure_optimizers(self) -> Any:
        return {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.optimizer](self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TokenData(32, seed=0), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TokenData(16, seed=1), batch_size=self.batch_size)

    test_dataloader = predict_dataloader = val_dataloader


MODELS = {"cnn": (LitClassifier, CNN_RECIPE), "llama": (LitLlama, LLAMA_RECIPE)}


class MemoryLogger(Logger):
    """Keeps every logged metric in memory: ``history[name] = [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, float(value)))


def trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer for tests; keyword arguments override."""
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                                   deterministic=True)
    if "max_steps" in kwargs:
        options["max_epochs"] = None
    options.update(kwargs)
    return pl.Trainer(**options)


def quantizer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of every quantizer (scales, zero points, observer ranges), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "quantizer." in k and isinstance(v, torch.Tensor)}
