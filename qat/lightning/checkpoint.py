"""`load_checkpoint`: a fresh float model + a QAT checkpoint → the trained QAT model, no Trainer needed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qat.errors import QATError
from qat.prepare import prepare
from qat.recipe import QuantRecipe


def read_torch_file(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; a missing or unreadable file is a
    QATError naming ``what`` and the path."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QATError(f"{what} `{path}` does not exist") from None
    except Exception as error:
        raise QATError(f"cannot read {what} `{path}`: {error}") from error


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    recipe: QuantRecipe | Mapping[str, Any] | str | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Prepare ``model`` (a freshly built float model) as the QAT run did and load its weights,
    scales, zero points and observer state from a Lightning checkpoint. Returns ``model``.

    The recipe and the folded Conv+BatchNorm pairs are read from the checkpoint; a checkpoint
    saved with ``save_weights_only=True`` has neither, so pass ``recipe`` (and ``example_inputs``
    when the model has BatchNorms to fold). The file is loaded with ``weights_only=True``.

    Example::

        model = qat.lightning.load_checkpoint(LitClassifier(), "checkpoints/last.ckpt")
        model.eval()
        logits = model(images)
    """
    checkpoint = read_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise QATError(f"`{path}` is not a Lightning checkpoint (no `state_dict` key)")
    saved = checkpoint.get("qat")
    if saved is None and recipe is None:
        raise QATError(f"`{path}` carries no QAT recipe (saved with save_weights_only=True?); pass recipe= (and example_inputs= "
                       "for BatchNorm folding)")
    prepare(model, saved["recipe"] if recipe is None else recipe, example_inputs, bn_folds=saved["bn_folds"] if saved else None,
            residuals=saved.get("residuals") if saved else None)
    model.load_state_dict(checkpoint["state_dict"])
    return model
