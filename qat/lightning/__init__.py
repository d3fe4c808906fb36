"""Lightning integration: :class:`QuantizationAwareTraining` adds QAT to a training loop as one
callback; :func:`load_checkpoint` rebuilds a QAT model from its checkpoint without a Trainer."""

from qat.lightning.checkpoint import load_checkpoint
from qat.lightning.quantization_aware_training import QuantizationAwareTraining

__all__ = ["QuantizationAwareTraining", "load_checkpoint"]
