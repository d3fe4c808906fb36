"""The speed wing: faster equivalents of the numeric core's training path, bit for bit the same.

- :mod:`qat.speed.masks` and :mod:`qat.speed.codes`: fixed-parameter fake quantization and its
  straight-through mask in the fewest passes; the result kept as one-byte integer codes;
- :mod:`qat.speed.functions`: the autograd functions built on them (a saved mask, input or codes;
  BatchNorm folding as one node; a weight's value kept and used again);
- :mod:`qat.speed.fused_kernels`: the same math as Triton kernels on a GPU;
- :mod:`qat.speed.recompute`: a layer's quantized operands recomputed in the backward pass;
- :mod:`qat.speed.allocator`: keep freed CPU memory for the next step (opt-in);
- :mod:`qat.speed.wing`: which path fits a call, registered with the core's one door,
  :mod:`qat.core.faster`, when this package is imported (``import qat`` does).

The core never imports this package: without it (or inside :func:`qat.core.faster.plain`) every
value and gradient comes from :class:`qat.core.fake_quant.FakeQuantizeFunction`.
"""

from qat.core import faster
from qat.speed.wing import Wing

faster.register(Wing())
