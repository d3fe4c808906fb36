"""The numeric core that everything else calls: spec → observer → fake-quant → quantizer.

- :mod:`qat.core.spec`: :class:`~qat.core.spec.QuantSpec`, one quantizer's numeric format;
- :mod:`qat.core.observers` and :mod:`qat.core.qparams`: ranges, and scales from ranges;
- :mod:`qat.core.fake_quant`: the fake-quantization contract (training and export faces);
- :mod:`qat.core.quantizer`: :class:`~qat.core.quantizer.Quantizer`, spec + observer + state;
- :mod:`qat.core.snapshot`: buffers read by a compiled backward after a forward updated them.

The core imports nothing else from ``qat`` but :mod:`qat.errors`; faster equivalents of its
autograd function register themselves with it (:mod:`qat.speed`).
"""
