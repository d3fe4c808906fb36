"""Looking at a quantized model: per-layer sensitivity (:mod:`~qat.analysis.sensitivity`), bit
widths under a size budget (:mod:`~qat.analysis.mixed_precision`), what to log during training
(:mod:`~qat.analysis.stats`), the per-layer table (:mod:`~qat.analysis.summary`) and its plot
(:mod:`~qat.analysis.plots`)."""
