"""Converters from the qparams sidecar to AIMET / QNN encodings 1.0.0 and a TensorRT calibration cache."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import struct

import pytest

from qat.errors import QATError
from qat.export import dialects
from qat.export.dialects import (
    aimet_encodings,
    omitted_tensors,
    tensorrt_calibration_cache,
    write_aimet_encodings,
    write_tensorrt_calibration_cache,
)


def entry(role: str, float_tensor: str, bits: int, signed: bool, scale: list, zero_point: list, **kw) -> dict:
    low = -(2 ** (bits - 1)) if signed else 0
    out = {
        "role": role, "layer": float_tensor.split(".")[0], "float_tensor": float_tensor,
        "dtype": f"{'' if signed else 'u'}int{max(bits, 4) if bits <= 4 else 8 if bits <= 8 else 16}",
        "bits": bits, "qmin": low, "qmax": low + 2**bits - 1, "signed": signed, "symmetric": False,
        "granularity": "per_tensor", "axis": None, "block_size": None, "dynamic": False, "shape": [4, 8],
        "scale_shape": [], "scale": scale, "zero_point": zero_point, "observed_min": None, "observed_max": None, "learnable": False,
    }  # fmt: skip
    return out | kw


@pytest.fixture
def qparams() -> dict:
    return {
        "format": "lightning-qat.core.qparams",
        "tensors": {
            "conv1.input_quantized": entry("activation", "x", 8, False, [0.0184], [121], observed_min=[-2.23], observed_max=[2.46]),
            "conv1.weight_quantized": entry(
                "weight", "conv1.weight", 4, True, [0.031, 0.029, 0.04, 0.035], [0, 0, 0, 0],
                symmetric=True, granularity="per_channel", axis=0, shape=[4, 3, 3, 3], scale_shape=[4],
            ),
            "fc1.weight_quantized": entry(
                "weight", "fc1.weight", 4, True, [0.01, 0.02, 0.03, 0.04], [1, -2, 0, 3],
                granularity="per_group", axis=1, block_size=4, shape=[2, 8], scale_shape=[2, 2],
            ),
            "fc2.input_quantized": entry(
                "activation", "fc2.input", 8, True, None, None, symmetric=True, granularity="per_token", axis=-1, dynamic=True,
            ),
            "fc2.weight_quantized": entry("weight", "fc2.weight", 3, True, [0.1], [1], dtype="int4"),
        },
        "layers": {"conv1": {"type": "Conv2d"}, "fc1": {"type": "Linear"}, "fc2": {"type": "Linear"}},
    }  # fmt: skip


# -- AIMET / QNN 1.0.0 -------------------------------------------------------------------------------


def test_aimet_layout_and_values(qparams):
    enc = aimet_encodings(qparams)
    assert set(enc) == {"version", "activation_encodings", "param_encodings"}
    assert enc["version"] == "1.0.0"
    assert enc["activation_encodings"] == [
        {"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False, "scale": [0.0184], "offset": [-121]}
    ]
    params = {e["name"]: e for e in enc["param_encodings"]}
    assert list(params) == ["conv1.weight", "fc1.weight", "fc2.weight"]
    assert params["conv1.weight"] == {
        "name": "conv1.weight", "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 4, "is_sym": True,
        "scale": [0.031, 0.029, 0.04, 0.035], "offset": [-8, -8, -8, -8],
    }  # fmt: skip
    assert params["fc1.weight"] == {
        "name": "fc1.weight", "dtype": "INT", "enc_type": "PER_BLOCK", "bw": 4, "is_sym": False,
        "scale": [0.01, 0.02, 0.03, 0.04], "offset": [-9, -6, -8, -11], "block_size": 4,
    }  # fmt: skip
    # 3 bits stored in int4: bw follows `bits`, and the offset uses 2**(3-1) = 4, not 8.
    assert params["fc2.weight"]["bw"] == 3
    assert params["fc2.weight"]["offset"] == [-1 - 4]
    json.dumps(enc, allow_nan=False)  # plain JSON values only


def test_aimet_offset_dequantizes_every_code_like_onnx(qparams):
    tensors = qparams["tensors"]
    by_name = {t["float_tensor"]: t for t in tensors.values()}
    enc = aimet_encodings(qparams)
    checked = 0
    for e in enc["activation_encodings"] + enc["param_encodings"]:
        t = by_name[e["name"]]
        low = -(2 ** (t["bits"] - 1)) if t["signed"] else 0
        for s, zp, offset in zip(e["scale"], t["zero_point"], e["offset"], strict=True):
            assert offset == (-zp - 2 ** (t["bits"] - 1) if t["signed"] else -zp)
            for q in range(t["qmin"], t["qmax"] + 1):
                q_unsigned = q - low  # AIMET / QNN codes run over [0, 2**bw - 1]
                assert 0 <= q_unsigned <= 2 ** e["bw"] - 1
                assert (q_unsigned + offset) * s == (q - zp) * s
                checked += 1
    assert checked == 256 + 4 * 16 + 4 * 16 + 8


def test_aimet_narrow_range_keeps_the_offset_and_bad_ranges_are_named(qparams):
    tensors = qparams["tensors"]
    tensors["conv1.input_quantized"] |= {"signed": True, "qmin": -127, "qmax": 127, "symmetric": True, "zero_point": [0]}
    assert aimet_encodings(qparams)["activation_encodings"][0]["offset"] == [-128]
    tensors["conv1.input_quantized"]["qmin"] = -100
    with pytest.raises(QATError, match=r"conv1\.input_quantized.*\[-100, 127\]"):
        aimet_encodings(qparams)


def test_aimet_leaves_out_dynamic_activations_and_says_so(qparams, caplog):
    with caplog.at_level(logging.INFO, logger="qat.export.dialects"):
        enc = aimet_encodings(qparams)
    assert "fc2.input" not in [e["name"] for e in enc["activation_encodings"]]
    assert list(omitted_tensors(qparams, "aimet")) == ["fc2.input_quantized"]
    assert "run time" in omitted_tensors(qparams, "aimet")["fc2.input_quantized"]
    assert "fc2.input_quantized" in caplog.text


@pytest.mark.parametrize(
    "tensor, change, message",
    [
        ("fc1.weight_quantized", {"axis": 0, "scale_shape": [1, 8]}, "PER_BLOCK"),
        (
            "fc1.weight_quantized",
            {"shape": [2, 8, 3, 3], "scale_shape": [2, 2, 3, 3], "scale": [0.1] * 36, "zero_point": [0] * 36},
            "PER_BLOCK",
        ),
        ("fc1.weight_quantized", {"shape": [2, 10]}, "PER_BLOCK"),  # ragged last block
        ("fc1.weight_quantized", {"shape": [3, 8]}, "PER_BLOCK"),  # 4 scales for 6 blocks
        ("conv1.weight_quantized", {"axis": 1}, "axis"),
        ("conv1.input_quantized", {"granularity": "per_channel", "axis": 1, "scale": [0.1, 0.2], "zero_point": [0, 0]}, "per_channel"),
        ("conv1.input_quantized", {"scale": [0.0]}, "positive"),
        ("conv1.input_quantized", {"zero_point": [1, 2]}, "zero points"),
    ],
)
def test_aimet_rejects_what_1_0_0_cannot_express_naming_the_tensor(qparams, tensor, change, message):
    qparams["tensors"][tensor] |= change
    with pytest.raises(QATError, match=rf"`{tensor}`.*{message}"):
        aimet_encodings(qparams)


def test_aimet_per_channel_axis_1_is_the_output_channel_of_a_conv_transpose(qparams):
    qparams["tensors"]["conv1.weight_quantized"]["axis"] = 1
    qparams["layers"]["conv1"]["type"] = "ConvTranspose2d"
    assert aimet_encodings(qparams)["param_encodings"][0]["enc_type"] == "PER_CHANNEL"


def test_one_encoding_per_tensor_even_when_two_quantizers_read_it(qparams):
    tensors = qparams["tensors"]
    tensors["conv2.input_quantized"] = copy.deepcopy(tensors["conv1.input_quantized"])
    assert len(aimet_encodings(qparams)["activation_encodings"]) == 1
    assert tensorrt_calibration_cache(qparams).count("\nx: ") == 1
    tensors["conv2.input_quantized"] |= {"zero_point": [120], "observed_max": [2.5]}
    for convert in (aimet_encodings, tensorrt_calibration_cache):
        with pytest.raises(QATError, match=r"conv1\.input_quantized.*conv2\.input_quantized.*`x`"):
            convert(qparams)


def test_malformed_sidecars_are_rejected_clearly(qparams):
    with pytest.raises(QATError, match="tensors"):
        aimet_encodings({"format": "something else"})
    del qparams["tensors"]["conv1.input_quantized"]["bits"]
    with pytest.raises(QATError, match=r"conv1\.input_quantized.*`bits`"):
        aimet_encodings(qparams)


def test_numbers_stored_by_reference_must_be_resolved_first(qparams):
    qparams["tensors"]["fc1.weight_quantized"] |= {"scale": {"initializer": "fc1.weight_scale", "count": 4},
                                                   "zero_point": {"initializer": "fc1.weight_zero_point", "count": 4}}
    message = ("tensor `fc1.weight_quantized`: the scales are stored in the model (`fc1.weight_scale`); read the sidecar with "
               "qat.export.sidecar.read_resolved(onnx_path) or resolve_numbers(qparams, onnx_path) first")
    with pytest.raises(QATError, match=f"^{re.escape(message)}$"):
        aimet_encodings(qparams)
    assert tensorrt_calibration_cache(qparams).count("\n") == 2  # TensorRT leaves weights out: nothing to resolve


# -- TensorRT calibration cache -----------------------------------------------------------------------


def decode(cache: str) -> tuple[str, dict[str, float]]:
    header, *lines = cache.splitlines()
    values = {}
    for line in lines:
        name, code = line.rsplit(": ", 1)
        assert len(code) == 8
        values[name] = struct.unpack(">f", bytes.fromhex(code))[0]
    return header, values


def test_tensorrt_cache_header_and_scales(qparams):
    cache = tensorrt_calibration_cache(qparams)
    assert cache.endswith("\n")
    header, values = decode(cache)
    assert header == "TRT-8600-EntropyCalibration2"
    assert values == {"x": pytest.approx(2.46 / 127, rel=1e-7)}  # observed range: max(|-2.23|, |2.46|)
    assert decode(tensorrt_calibration_cache(qparams, trt_version="100900"))[0] == "TRT-100900-EntropyCalibration2"


def test_tensorrt_exact_bytes_for_a_known_value(qparams):
    qparams["tensors"]["conv1.input_quantized"] |= {"observed_min": [-63.5], "observed_max": [1.0]}
    assert tensorrt_calibration_cache(qparams).splitlines()[1] == "x: 3f000000"  # 63.5 / 127 = 0.5


def test_tensorrt_takes_the_ends_of_a_summarised_observed_range(qparams):
    qparams["tensors"]["conv1.input_quantized"] |= {"observed_min": {"min": -63.5, "max": -1.0, "count": 2048},
                                                    "observed_max": {"min": 0.5, "max": 1.0, "count": 2048}}
    assert tensorrt_calibration_cache(qparams).splitlines()[1] == "x: 3f000000"  # 63.5 / 127 = 0.5


@pytest.mark.parametrize("change", [{"observed_min": None, "observed_max": None}, {"learnable": True}])
def test_tensorrt_amax_from_the_grid_without_a_usable_observed_range(qparams, change):
    qparams["tensors"]["conv1.input_quantized"] |= change
    amax = max(abs((0 - 121) * 0.0184), abs((255 - 121) * 0.0184))  # 2.4656
    assert decode(tensorrt_calibration_cache(qparams))[1] == {"x": pytest.approx(amax / 127, rel=1e-7)}


def test_tensorrt_leaves_out_weights_dynamic_and_16_bit_activations(qparams):
    qparams["tensors"]["head.input_quantized"] = entry("activation", "head.input", 16, False, [1e-4], [30000])
    omitted = omitted_tensors(qparams, "tensorrt")
    assert set(omitted) == {
        "conv1.weight_quantized", "fc1.weight_quantized", "fc2.weight_quantized", "fc2.input_quantized", "head.input_quantized",
    }  # fmt: skip
    assert "16-bit" in omitted["head.input_quantized"]
    assert list(decode(tensorrt_calibration_cache(qparams))[1]) == ["x"]


def test_tensorrt_rejects_per_channel_activations_and_bad_versions(qparams):
    qparams["tensors"]["conv1.input_quantized"] |= {"granularity": "per_channel", "axis": 1, "scale": [0.1, 0.2], "zero_point": [0, 0]}
    with pytest.raises(QATError, match=r"`conv1\.input_quantized`.*one scale per tensor"):
        tensorrt_calibration_cache(qparams)
    with pytest.raises(QATError, match="trt_version"):
        tensorrt_calibration_cache({"tensors": {}}, trt_version="8.6")


# -- writing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("write", [write_aimet_encodings, write_tensorrt_calibration_cache])
def test_write_is_atomic_and_leaves_no_temporary(qparams, tmp_path, write):
    path = write(qparams, tmp_path / "out.txt")
    assert path == tmp_path / "out.txt"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]
    expected = (
        json.dumps(aimet_encodings(qparams), indent=2) + "\n" if write is write_aimet_encodings else tensorrt_calibration_cache(qparams)
    )
    assert path.read_text() == expected


@pytest.mark.parametrize("write", [write_aimet_encodings, write_tensorrt_calibration_cache])
def test_a_failed_write_leaves_the_earlier_file_untouched(qparams, tmp_path, monkeypatch, write):
    path = write(qparams, tmp_path / "out.txt")
    before = path.read_bytes()
    bad = copy.deepcopy(qparams)
    bad["tensors"]["conv1.input_quantized"] |= {"granularity": "per_channel", "scale": [0.1, 0.2], "zero_point": [0, 0]}
    with pytest.raises(QATError, match=r"conv1\.input_quantized"):
        write(bad, path)

    def broken_replace(src, dst):
        raise OSError("disk full")

    qparams["tensors"]["conv1.input_quantized"]["scale"] = [0.5]
    monkeypatch.setattr(dialects.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write(qparams, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_write_into_a_missing_folder_is_a_clear_error(qparams, tmp_path):
    for write in (write_aimet_encodings, write_tensorrt_calibration_cache):
        with pytest.raises(QATError, match="does not exist"):
            write(qparams, tmp_path / "missing" / "out.txt")
    assert not (tmp_path / "missing").exists()
