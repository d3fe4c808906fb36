"""lightning-qat: quantization-aware training down to 4 bits, from a Lightning callback to ONNX.

The numeric core, used by everything else:

- :class:`QuantSpec` — one quantizer's numeric format;
- :mod:`qat.core.fake_quant` — the fake-quantization math (training and export faces);
- :mod:`qat.core.observers` — range statistics; :mod:`qat.core.qparams` — scales from ranges;
- :class:`Quantizer` — spec + observer + state + switches;
- :class:`QuantRecipe` + :func:`prepare` — which layers to quantize and how;
- :func:`summary`, :func:`strip`, and the phase switches in :mod:`qat.training.control`;
- :func:`calibrate` — post-training quantization: observe ranges on a few batches, then freeze them;
- :class:`QATSchedule` — the phases of a run by step or epoch; :func:`layer_stats` — what to log;
- :func:`sensitivity` — each layer quantized alone at each bit width; :func:`mixed_precision` —
  per-layer bit widths under a size budget, as a recipe;
- ``export_onnx`` — the ONNX file with integer weights, verified in ONNX Runtime (imported on first use);
- ``export_genai`` — a Llama-family LLM as an onnxruntime-genai folder: int4 MatMulNBits, a key-value cache.

The Lightning callback is :class:`qat.lightning.QuantizationAwareTraining`.
"""

import qat.speed  # noqa: F401  (registers the speed wing with the core: qat.core.faster)
from qat.analysis.mixed_precision import MixedPrecision, mixed_precision
from qat.analysis.sensitivity import SensitivityTable, sensitivity
from qat.analysis.stats import layer_stats
from qat.analysis.summary import QuantSummary, strip, summary
from qat.core.fake_quant import exporting, fake_quantize
from qat.core.quantizer import Quantizer
from qat.core.spec import Granularity, ObserverKind, QuantSpec
from qat.errors import ConfigError, QATError
from qat.preparation.prepare import is_prepared, prepare
from qat.preparation.recipe import LayerRule, QuantRecipe
from qat.training.calibrate import CalibrationWarning, calibrate
from qat.training.clipping import ClipTracker
from qat.training.control import (
    deployed,
    evaluating,
    freeze_bn_stats,
    quantizers,
    set_fake_quant,
    set_observers,
    set_recompute,
    set_save_codes,
    set_weight_reuse,
)
from qat.training.schedule import Phase, QATSchedule
from qat.version import __version__

__all__ = [
    "CalibrationWarning",
    "ClipTracker",
    "ConfigError",
    "ExportResult",
    "GenaiExport",
    "Granularity",
    "LayerRule",
    "MixedPrecision",
    "ObserverKind",
    "Phase",
    "QATError",
    "QATSchedule",
    "QuantRecipe",
    "QuantSpec",
    "QuantSummary",
    "Quantizer",
    "SensitivityTable",
    "__version__",
    "calibrate",
    "deployed",
    "evaluating",
    "export_genai",
    "export_onnx",
    "exporting",
    "fake_quantize",
    "freeze_bn_stats",
    "is_prepared",
    "layer_stats",
    "mixed_precision",
    "prepare",
    "quantizers",
    "sensitivity",
    "set_fake_quant",
    "set_observers",
    "set_recompute",
    "set_save_codes",
    "set_weight_reuse",
    "strip",
    "summary",
]


def __getattr__(name: str):
    # the exporter imports onnxruntime and onnxscript (about a second): only when it is used
    if name in ("export_onnx", "ExportResult"):
        from qat.export import exporter

        return getattr(exporter, name)
    if name in ("export_genai", "GenaiExport"):
        from qat.export import genai

        return getattr(genai, name)
    raise AttributeError(f"module 'qat' has no attribute {name!r}")
