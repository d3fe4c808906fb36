"""Preparing a model: which layers to quantize and how (:mod:`~qat.preparation.recipe`), swapping
them for their quantized twins (:mod:`~qat.preparation.prepare`), folding BatchNorm into
convolutions (:mod:`~qat.preparation.bn_fold`) and quantizing residual additions
(:mod:`~qat.preparation.residuals`)."""
