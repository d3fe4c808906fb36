"""ONNX export: lowering of the fake-quant op to Q/DQ (:mod:`qat.export.qdq`)."""
