"""The int4 / uint4 QuantizeLinear / DequantizeLinear conformance cases in ``export/conformance``.

They are shipped for device runtimes, so they must not drift from their generator, and their expected
outputs (computed with numpy from the formula) must agree bit for bit with ``onnx.reference``, with
ONNX Runtime on the CPU, and with qat's own torch math. A runtime that disagrees is not hidden: its
failing case is an ``xfail(strict=True)`` naming the version, and is listed in the README there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from qat.core.fake_quant import broadcast_qparam, fake_quantize_math

CONFORMANCE = Path(__file__).resolve().parents[1] / "export" / "conformance"
NOT_CASE_FILES = {"generate.py", "README.md"}


def _load_generator() -> ModuleType:
    """``export/conformance/generate.py`` (not a package, so loaded from its path)."""
    spec = importlib.util.spec_from_file_location("qat_conformance_generate", CONFORMANCE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


generator = _load_generator()
CASES = {case.name: case for case in generator.CASES}
QDQ_CASES = [name for name, case in CASES.items() if case.kind == "qdq"]

# Known disagreements, by the version they were seen with (see export/conformance/README.md).
REFERENCE_VERSION = "1.23.2"
REFERENCE_FAILURES = {
    "qdq_int4_axis0_saturate_huge": "QuantizeLinear casts rint(x / s) to int32 before adding the zero point and saturating; "
    "for |x / s| >= 2**31 or ±inf the cast gives INT32_MIN (x86) and adding a negative zero point wraps it to a large "
    "positive value, so such inputs saturate to qmin or qmax by the zero point's sign, not by x's sign",
}
ORT_VERSION = "1.32.0"
ORT_FAILURES: dict[str, str] = {}  # onnxruntime 1.32.0 (CPUExecutionProvider) passes every case, optimized or not


def _with_known_failures(names: list[str], failures: dict[str, str], tool: str, recorded: str, installed: str) -> list:
    """Parameters, a known failure marked xfail: strict on the version it was recorded with, lenient on others."""
    params = []
    for name in names:
        marks = ()
        if name in failures:
            marks = pytest.mark.xfail(strict=installed == recorded, reason=f"{tool} {recorded}: {failures[name]}")
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _case_files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in NOT_CASE_FILES and "__pycache__" not in path.parts
    }


def _load_case(name: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    data = CONFORMANCE / name / "test_data_set_0"
    x = numpy_helper.to_array(onnx.load_tensor(str(data / "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(str(data / "output_0.pb")))
    return onnx.load(str(CONFORMANCE / name / "model.onnx")), x, expected


def _assert_bit_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype == np.float32 and actual.shape == expected.shape
    mismatched = np.flatnonzero(actual.view(np.uint32) != expected.view(np.uint32))
    assert mismatched.size == 0, f"{mismatched.size} of {expected.size} differ, first at flat index {mismatched[:5]}: " + (
        f"got {actual.reshape(-1)[mismatched[:5]]}, want {expected.reshape(-1)[mismatched[:5]]}"
    )


def test_committed_cases_match_the_generator(tmp_path: Path) -> None:
    generator.generate(tmp_path)
    committed, regenerated = _case_files(CONFORMANCE), _case_files(tmp_path)
    assert sorted(committed) == sorted(regenerated), "run: python export/conformance/generate.py"
    changed = [path for path in regenerated if committed[path] != regenerated[path]]
    assert not changed, f"stale files, run: python export/conformance/generate.py ({changed[:5]})"


def test_int4_packing_is_low_nibble_first() -> None:
    values = np.array([1, -2, 3])
    assert generator.pack_int4(values) == bytes([0xE1, 0x03])  # 1 | (-2 & 0xF) << 4, then 3 and a zero pad nibble
    tensor = generator.int4_tensor("t", onnx.TensorProto.INT4, values)
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int64), values)


@pytest.mark.parametrize("name", _with_known_failures(list(CASES), REFERENCE_FAILURES, "onnx", REFERENCE_VERSION, onnx.__version__))
def test_onnx_reference(name: str) -> None:
    model, x, expected = _load_case(name)
    with np.errstate(all="ignore"):
        (actual,) = ReferenceEvaluator(model).run(None, {"x": x})
    _assert_bit_exact(actual, expected)


@pytest.mark.parametrize("level", ["ORT_ENABLE_ALL", "ORT_DISABLE_ALL"])
@pytest.mark.parametrize("name", _with_known_failures(list(CASES), ORT_FAILURES, "onnxruntime", ORT_VERSION, ort.__version__))
def test_onnxruntime(name: str, level: str) -> None:
    model, x, expected = _load_case(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"x": x})
    _assert_bit_exact(actual, expected)


@pytest.mark.parametrize("name", QDQ_CASES)
def test_torch_fake_quant(name: str) -> None:
    case = CASES[name]
    model, x, expected = _load_case(name)
    params = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    x_t = torch.tensor(x)
    axis = case.axis % x.ndim if case.axis is not None else 0
    scale = broadcast_qparam(torch.from_numpy(params["scale"]), x_t, axis, case.block_size)
    zero_point = broadcast_qparam(torch.from_numpy(params.get("zero_point", np.zeros_like(params["scale"]))), x_t, axis, case.block_size)
    actual = fake_quantize_math(x_t, scale, zero_point, *case.qrange)
    _assert_bit_exact(actual.numpy(), expected)
