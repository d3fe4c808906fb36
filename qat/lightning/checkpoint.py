"""`load_checkpoint`: a fresh float model + a QAT checkpoint → the trained QAT model, no Trainer needed.

A checkpoint is one file, or the folder Lightning's ``ModelParallelStrategy`` writes for a
sharded (FSDP2) run: a distributed checkpoint (``.metadata`` and one ``.distcp`` file per rank)
with ``meta.pt`` beside it for the rest (the ``"qat"`` key included). The folder's shards are
gathered into the model in this one process, with no process group."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.errors import QATError
from qat.preparation.prepare import prepare
from qat.preparation.recipe import QuantRecipe


def read_torch_file(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; a missing or unreadable file, or one
    that holds more than tensors and plain values, is one line naming ``what`` and the path."""
    if Path(path).is_dir():
        raise QATError(f"{what} `{path}` is a folder, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QATError(f"{what} `{path}` does not exist") from None
    except pickle.UnpicklingError as error:
        # torch's message is a page of advice; the line after "WeightsUnpickler error:" says what was refused
        found = re.search(r"WeightsUnpickler error: (.+?)(?:\.\s|\n|$)", str(error))
        reason = found.group(1).strip() if found else str(error).strip().splitlines()[0]
        raise QATError(f"{what} `{path}` is not a plain tensor file: torch.load(weights_only=True) refused it ({reason})") from None
    except Exception as error:
        raise QATError(f"{what} `{path}` is not a file written by torch.save ({type(error).__name__}: "
                       f"{str(error).strip().splitlines()[0] if str(error).strip() else '?'})") from None


SHARDED_METADATA = "meta.pt"
"""The file beside a sharded checkpoint's shards that holds everything but the model and optimizer state."""


def _read_metadata(path: Path) -> Mapping[str, Any]:
    """A checkpoint's non-tensor part: the file itself, or a sharded checkpoint folder's ``meta.pt``."""
    if not path.is_dir():
        checkpoint = read_torch_file(path, "checkpoint")
        if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
            raise QATError(f"`{path}` is not a Lightning checkpoint (no `state_dict` key)")
        return checkpoint
    if not (path / ".metadata").is_file() or not (path / SHARDED_METADATA).is_file():
        raise QATError(f"checkpoint `{path}` is a folder but not a sharded Lightning checkpoint (it needs `.metadata` and "
                       f"`{SHARDED_METADATA}`, as ModelParallelStrategy writes them)")
    return read_torch_file(path / SHARDED_METADATA, "checkpoint metadata")


def _load_shards(model: nn.Module, path: Path) -> None:
    """Gather the model state of the sharded checkpoint folder ``path`` into ``model``, in this process:
    ``torch.distributed.checkpoint`` reads each tensor's shards into the model's own (whole) tensors
    and the extra states (quantizer switches) into the dict, which ``load_state_dict`` then applies."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=path, no_dist=True)
    except Exception as error:  # DCP wraps a missing key or a size mismatch in a CheckpointException of every rank's traceback
        found = re.search(r"(Missing key in checkpoint state_dict: [^\s'\"]+|Size mismatch[^\n'\"]*)", str(error))
        raise QATError(f"`{path}` does not fit {type(model).__name__}: {found.group(1) if found else type(error).__name__}; "
                       "is it a checkpoint of this model class (and --init-args)?") from None
    model.load_state_dict(state["state_dict"])


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
    when the model has BatchNorms to fold). The file is loaded with ``weights_only=True``. ``path``
    may also be the folder of a sharded (FSDP2) checkpoint: its shards are gathered here.

    Example::

        model = qat.lightning.load_checkpoint(LitClassifier(), "checkpoints/last.ckpt")
        model.eval()
        logits = model(images)
    """
    path = Path(path)
    checkpoint = _read_metadata(path)
    saved = checkpoint.get("qat")
    if saved is None and recipe is None:
        raise QATError(f"`{path}` carries no QAT recipe (saved with save_weights_only=True?); pass recipe= (and example_inputs= "
                       "for BatchNorm folding)")
    prepare(model, saved["recipe"] if recipe is None else recipe, example_inputs, bn_folds=saved["bn_folds"] if saved else None,
            residuals=saved.get("residuals") if saved else None)
    if path.is_dir():
        _load_shards(model, path)
        return model
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # torch lists every missing and unexpected key: kilobytes for a real model
        raise QATError(f"`{path}` does not fit {type(model).__name__}: {_key_mismatch(model, checkpoint['state_dict'], error)}; "
                       "is it a checkpoint of this model class (and --init-args)?") from None
    return model


def _key_mismatch(model: nn.Module, state_dict: Mapping[str, Any], error: RuntimeError) -> str:
    """The first few keys ``model`` misses or does not expect in ``state_dict``, or torch's first line (a size mismatch)."""
    expected, saved = set(model.state_dict()), set(state_dict)
    parts = []
    for label, keys in (("missing", sorted(expected - saved)), ("unexpected", sorted(saved - expected))):
        if keys:
            parts.append(f"{len(keys)} {label} keys (`{'`, `'.join(keys[:3])}`{', …' if len(keys) > 3 else ''})")
    if parts:
        return ", ".join(parts)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else lines[0]
