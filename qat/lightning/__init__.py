"""Lightning integration: :class:`QuantizationAwareTraining` adds QAT to a training loop as one
callback; :class:`ONNXExport` writes the verified ONNX artifacts when training ends
(:class:`GenaiFolderExport`: an LLM's onnxruntime-genai folder);
:func:`load_checkpoint` rebuilds a QAT model from its checkpoint without a Trainer."""

from qat.lightning.checkpoint import load_checkpoint
from qat.lightning.export_callback import ONNXExport
from qat.lightning.genai_callback import GenaiFolderExport
from qat.lightning.quantization_aware_training import QuantizationAwareTraining

__all__ = ["GenaiFolderExport", "ONNXExport", "QuantizationAwareTraining", "load_checkpoint"]
