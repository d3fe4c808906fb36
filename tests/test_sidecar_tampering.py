"""`qat verify` against a corpus of bad pairs: each tampered sidecar or graph gives one exact line.

Three kinds of damage: a sidecar that breaks the format (the JSON Schema or the cross-field rules
of ``qat.export.sidecar.validate``: exit status 2, one ``error:`` line); a graph and a sidecar
that are each well-formed, with the model's sha256 recomputed, but disagree (exit status 1, one
``problem:`` line per disagreement); and a pair that is consistent but computes something else
than the checkpoint, which only ``qat verify --model … --checkpoint …`` can see.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from lightning_models import CNN_RECIPE, LitClassifier, trainer
from onnx import helper, numpy_helper
from tiny_models import TinyCNN

import qat
from qat.app.cli import main
from qat.export import dialects
from qat.export.exporter import FloatFallbackWarning
from qat.export.sidecar import read_resolved, resolve_numbers, sha256, sidecar_path
from qat.export.verify import verify_against_model
from qat.lightning import QuantizationAwareTraining

RECIPE = {"weight": {"bits": 4}, "rules": [{"types": "Linear", "weight": {"bits": 4, "granularity": "per_group", "group_size": 16}}]}
"""int4 weights: per channel in the convolutions (scales inline), per group of 16 in the Linear
layers (scales by reference to the model's initializers); uint8 activations."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> qat.ExportResult:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = qat.prepare(TinyCNN(), RECIPE, example_inputs=x)
    for _ in range(3):
        model(torch.randn_like(x))
    with pytest.warns(FloatFallbackWarning):
        return qat.export_onnx(model, x, tmp_path_factory.mktemp("cnn") / "cnn.onnx")


def pair(source: Path, folder: Path) -> Path:
    """A copy of the model ``source`` and its sidecar in ``folder``."""
    target = folder / source.name
    shutil.copy(source, target)
    shutil.copy(sidecar_path(source), sidecar_path(target))
    return target


def tamper_sidecar(path: Path, change: Callable[[dict], None]) -> None:
    """Edit the sidecar as parsed JSON (NaN and Infinity written as Python's json writes them)."""
    qparams = json.loads(sidecar_path(path).read_text())
    change(qparams)
    sidecar_path(path).write_text(json.dumps(qparams))


def tamper_graph(path: Path, change: Callable[[onnx.ModelProto], None]) -> None:
    """Edit the model and record its new sha256 in the sidecar, as a careful forger would."""
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))
    tamper_sidecar(path, lambda q: q["model"].update(sha256=sha256(path)))


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def set_array(model: onnx.ModelProto, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    tensor = initializer(model, name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), name))


def verify(path: Path, capsys, *options: str) -> tuple[int, list[str], str]:
    """``qat verify path``: exit status, the problem lines, and stderr."""
    status = main(["verify", str(path), *options])
    out, err = capsys.readouterr()
    return status, [line.removeprefix("  problem: ") for line in out.splitlines() if line.startswith("  problem: ")], err


def test_the_exported_pairs_verify_and_the_linear_scales_are_references(exported, capsys):
    for artifact in exported.artifacts.values():
        assert verify(artifact.path, capsys) == (0, [], "")
    entries = json.loads(exported.path.with_suffix(".qparams.json").read_text())["tensors"]
    assert entries["fc1.weight_quantized"]["scale"] == {"initializer": "fc1.weight_scale", "count": 32 * 32}
    assert set(entries["fc1.weight_quantized"]["observed_min"]) == {"min", "max", "count"}
    assert len(entries["conv1.weight_quantized"]["scale"]) == 8  # per channel: inline


# -- the sidecar breaks the format: `error: <file>: <field> <reason>`, exit status 2 ----------------------------

W, A, L = "tensors/conv1.weight_quantized", "tensors/conv1.input_quantized", "tensors/fc1.weight_quantized"


def _set(path: str, value) -> Callable[[dict], None]:
    def change(qparams: dict) -> None:
        *parents, last = path.split("/")
        node = qparams
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return change


BAD_SIDECARS = {
    "scale 0": (_set(f"{W}/scale/0", 0.0), f"`{W}/scale/0` 0.0 is less than or equal to the minimum of 0"),
    "negative scale": (_set(f"{W}/scale/3", -0.5), f"`{W}/scale/3` -0.5 is less than or equal to the minimum of 0"),
    "NaN scale": (_set(f"{W}/scale/1", float("nan")), f"`{W}/scale/1` is nan: every number must be finite"),
    "infinite scale": (_set(f"{A}/scale/0", float("inf")), f"`{A}/scale/0` is inf: every number must be finite"),
    "empty scale": (_set(f"{A}/scale", []), f"`{A}/scale` [] should be non-empty"),
    "zero point out of range": (_set(f"{A}/zero_point/0", 1000), f"`{A}/zero_point` holds 1000, outside [qmin, qmax] = [0, 255]"),
    "qmin > qmax": (_set(f"{W}/qmin", 9), f"`{W}` has qmin 9 > qmax 7"),
    "codes wider than the dtype": (_set(f"{W}/qmin", -128), f"`{W}` has codes [-128, 7], outside its dtype int4 [-8, 7]"),
    "codes wider than the bits": (_set(f"{W}/bits", 3), f"`{W}` has codes [-8, 7], more than its 3 bits hold"),
    "scale count vs scale_shape": (_set(f"{W}/scale_shape", [9]), f"`{W}/scale` has 8 numbers, `scale_shape` [9] holds 9"),
    "zero-point count": (_set(f"{W}/zero_point", [0] * 7), f"`{W}/zero_point` has 7 numbers for 8 scales"),
    "reference count vs scale_shape": (_set(f"{L}/scale/count", 1000), f"`{L}/scale` has 1000 numbers, `scale_shape` [32, 32] holds 1024"),
    "reference to another initializer": (_set(f"{L}/scale/initializer", "fc2.weight_scale"),
                                         f"`{L}/scale` refers to `fc2.weight_scale`, but `scale_tensor` is `fc1.weight_scale`"),
    "negative input dim": (_set("inputs/0/shape/1", -3), "`inputs/0/shape/1` -3 is less than the minimum of 1"),
    "huge input dim": (_set("inputs/0/shape/0", 10**12), "`inputs/0/shape/0` 1000000000000 is greater than the maximum of 2147483647"),
    "dtype unknown": (_set(f"{W}/dtype", "int5"),
                      f"`{W}/dtype` 'int5' is not one of ['int4', 'uint4', 'int8', 'uint8', 'int16', 'uint16', 'int32']"),
    "static entry without scales": (_set(f"{A}/scale", None), f"`{A}/scale` None is not of type 'array', 'object'"),
    "entry deleted (a layer's weight)": (lambda q: q["tensors"].pop("conv1.weight_quantized"),
                                         "`layers/conv1/weight` is `conv1.weight_quantized`, which is not a key of `tensors`"),
    "NaN parity figure": (_set("verification/max_abs_diff", float("nan")),
                          "`verification/max_abs_diff` is nan: every number must be finite"),
    "scale beyond float32": (_set(f"{W}/scale/0", 1e300), f"`{W}/scale` holds 1e+300, more than a float32 scale can be (3.402823e+38)"),
    "axis outside the shape": (_set(f"{W}/axis", 99), f"`{W}` has axis 99, outside its 4-dimensional shape [8, 3, 3, 3]"),
    "observed min above max": (lambda q: (_set(f"{A}/observed_min/0", 2.0)(q), _set(f"{A}/observed_max/0", 1.5)(q)),
                               f"`{A}/observed_min` holds 2.0 above `observed_max`'s 1.5 (at 0)"),
    "layers' weights swapped": (lambda q: (q["layers"]["conv1"].update(weight="dw.weight_quantized"),
                                           q["layers"]["dw"].update(weight="conv1.weight_quantized")),
                                "`layers/conv1/weight` is `dw.weight_quantized`, the weight of layer `dw` in `tensors`"),
    "a layer's input is a weight": (lambda q: q["layers"]["fc1"].update(input="fc2.weight_quantized"),
                                    "`layers/fc1/input` is `fc2.weight_quantized`, a weight in `tensors`"),
}


@pytest.mark.parametrize("case", BAD_SIDECARS)
def test_a_bad_sidecar_is_one_error_line(exported, tmp_path, capsys, case):
    change, message = BAD_SIDECARS[case]
    path = pair(exported.path, tmp_path)
    tamper_sidecar(path, change)
    assert verify(path, capsys) == (2, [], f"error: {sidecar_path(path)}: {message}\n")


def test_an_old_sidecar_is_refused_with_what_to_do(exported, tmp_path, capsys):
    path = pair(exported.path, tmp_path)
    tamper_sidecar(path, _set("version", "1.0"))
    assert verify(path, capsys) == (2, [], f"error: {sidecar_path(path)}: format version 1.0 is not readable by lightning-qat "
                                           f"{qat.__version__}, which reads version 2.1: export the model again (qat export, or "
                                           "qat.export_onnx) to write a version 2.1 sidecar\n")


# -- graph and sidecar disagree (sha256 recomputed): `problem:` lines, exit status 1 ----------------------------

def _delete_entry_and_references(name: str, layer: str, key: str) -> Callable[[dict], None]:
    def change(qparams: dict) -> None:
        del qparams["tensors"][name]
        qparams["layers"][layer][key] = None

    return change


def _add_entry(qparams: dict) -> None:
    qparams["tensors"]["ghost_quantized"] = dict(qparams["tensors"]["conv1.input_quantized"])


def _scale(value: float) -> Callable[[onnx.ModelProto], None]:
    """Set one of fc1's per-group scales, which the sidecar holds by reference, to ``value``."""
    def change(model: onnx.ModelProto) -> None:
        set_array(model, "fc1.weight_scale", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, value, a).astype(a.dtype))

    return change


def _int8_weight(model: onnx.ModelProto) -> None:
    for name in ("conv1.weight_quantized", "conv1.weight_zero_point"):
        set_array(model, name, lambda a: a.astype(np.int8))


def _extra_qdq(model: onnx.ModelProto) -> None:
    graph = model.graph
    last = next(n for n in graph.node if "output" in n.output)
    last.output[list(last.output).index("output")] = "head"
    graph.initializer.extend([numpy_helper.from_array(np.array(0.1, np.float32), "extra_scale"),
                              numpy_helper.from_array(np.array(128, np.uint8), "extra_zero_point")])
    graph.node.extend([helper.make_node("QuantizeLinear", ["head", "extra_scale", "extra_zero_point"], ["extra_quantized"]),
                       helper.make_node("DequantizeLinear", ["extra_quantized", "extra_scale", "extra_zero_point"], ["output"])])


def _other_quantize_scale(model: onnx.ModelProto) -> None:
    quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == "dw.input_quantized")
    quantize.input[1] = "fc1.input_scale"


BAD_GRAPHS = {
    "entry deleted": (None, _delete_entry_and_references("fc1.input_quantized", "fc1", "input"),
                      ["`fc1.input_quantized` is quantized in the model but has no entry in the metadata"]),
    "entry added": (None, _add_entry, ["`ghost_quantized` is listed in the metadata but is not a quantized tensor of the model"]),
    "dtype differs": (None, _set(f"{W}/dtype", "int8"), ["`conv1.weight_quantized` is int4 in the model, int8 in the metadata"]),
    "other scale initializer": (None, _set(f"{W}/scale_tensor", "dw.weight_scale"),
                                ["`conv1.weight_quantized`: its scale is `conv1.weight_scale` in the model, `dw.weight_scale` in the "
                                 "metadata"]),
    "scale 0 in the graph, by reference in the sidecar": (_scale(0.0), None, [
        "`fc1.weight_scale` (scale of `fc1.weight_quantized`) holds scales that are not finite and positive"]),
    "negative scale in the graph, by reference in the sidecar": (_scale(-0.01), None, [
        "`fc1.weight_scale` (scale of `fc1.weight_quantized`) holds scales that are not finite and positive"]),
    "NaN scale in the graph, by reference in the sidecar": (_scale(float("nan")), None, [
        "`fc1.weight_scale` (scale of `fc1.weight_quantized`) holds scales that are not finite and positive"]),
    "weight dtype changed in the graph": (_int8_weight, None, ["`conv1.weight_quantized` is int8 in the model, int4 in the metadata",
                                                                "layer `conv1` runs on QLinearConv here, on float Conv at export"]),
    "an extra Q/DQ pair": (_extra_qdq, None, ["`extra_quantized` is quantized in the model but has no entry in the metadata"]),
    "QuantizeLinear reads another scale": (_other_quantize_scale, None, [
        "`dw.input_quantized`: its QuantizeLinear and DequantizeLinear read different scales or zero points"]),
}


@pytest.mark.parametrize("case", BAD_GRAPHS)
def test_a_graph_that_disagrees_with_its_sidecar_is_one_problem_line(exported, tmp_path, capsys, case):
    graph_change, sidecar_change, problems = BAD_GRAPHS[case]
    path = pair(exported.path, tmp_path)
    if graph_change is not None:
        tamper_graph(path, graph_change)
    if sidecar_change is not None:
        tamper_sidecar(path, sidecar_change)
    assert verify(path, capsys) == (1, problems, "")


def test_scale_0_written_into_both_files_is_caught_by_the_format(exported, tmp_path, capsys):
    path = pair(exported.path, tmp_path)
    tamper_graph(path, lambda m: set_array(m, "conv1.weight_scale", lambda a: np.where(np.arange(a.size) == 2, 0, a).astype(a.dtype)))
    tamper_sidecar(path, _set(f"{W}/scale/2", 0.0))
    assert verify(path, capsys) == (2, [], f"error: {sidecar_path(path)}: `{W}/scale/2` 0.0 is less than or equal to the minimum of 0\n")


def test_codes_outside_the_recorded_range(exported, tmp_path, capsys):
    path = pair(exported.ort.path, tmp_path)  # the ort artifact holds the int4 codes in int8: room for a code beyond 7
    tamper_graph(path, lambda m: set_array(m, "conv1.weight_quantized", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, 100, a)
                                           .astype(a.dtype)))
    assert verify(path, capsys) == (1, ["`conv1.weight_quantized` holds codes outside [qmin, qmax] = [-8, 7]"], "")


# -- resolving references --------------------------------------------------------------------------------------

def test_resolved_numbers_are_the_initializers_and_feed_the_dialects(exported):
    qparams = json.loads(sidecar_path(exported.path).read_text())
    message = ("tensor `fc1.weight_quantized`: the scales are stored in the model (`fc1.weight_scale`); read the sidecar with "
               "qat.export.sidecar.read_resolved(onnx_path) or resolve_numbers(qparams, onnx_path) first")
    with pytest.raises(qat.QATError, match=f"^{re.escape(message)}$"):
        dialects.aimet_encodings(qparams)
    resolved = read_resolved(exported.path)
    scales = numpy_helper.to_array(initializer(onnx.load(str(exported.path)), "fc1.weight_scale"))
    assert resolved["tensors"]["fc1.weight_quantized"]["scale"] == scales.astype(np.float64).reshape(-1).tolist()
    assert resolved["tensors"]["conv1.weight_quantized"] == qparams["tensors"]["conv1.weight_quantized"]  # inline: as it was
    blocks = {e["name"]: e for e in dialects.aimet_encodings(resolved)["param_encodings"]}
    assert blocks["fc1.weight"]["enc_type"] == "PER_BLOCK" and len(blocks["fc1.weight"]["scale"]) == 1024


def test_resolving_against_the_wrong_model_names_the_initializer(exported):
    qparams = json.loads(sidecar_path(exported.path).read_text())
    qparams["tensors"]["fc1.weight_quantized"]["scale"]["initializer"] = "missing_scale"
    message = "`missing_scale` (scale of `fc1.weight_quantized`) is not an initializer of the model"
    with pytest.raises(qat.QATError, match=f"^{re.escape(message)}$"):
        resolve_numbers(qparams, exported.path)


# -- a consistent pair with other weights: only the checkpoint can tell -----------------------------------------

@pytest.fixture(scope="module")
def checkpoint_export(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    trainer(max_steps=6, limit_val_batches=0, default_root_dir=folder, enable_checkpointing=True,
            callbacks=[QuantizationAwareTraining(CNN_RECIPE, schedule={"fake_quant_from": 2}, print_summary=False)]).fit(LitClassifier())
    checkpoint = next(folder.rglob("*.ckpt"))
    out = folder / "net.onnx"
    assert main(["export", "--model", "lightning_models:LitClassifier", "--checkpoint", str(checkpoint), "--input-shape", "2,3,8,8",
                 "-o", str(out)]) == 0
    return out, checkpoint


def test_verify_with_the_checkpoint_passes_an_untouched_pair(checkpoint_export, capsys):
    out, checkpoint = checkpoint_export
    capsys.readouterr()
    status = main(["verify", str(out), str(out.with_name("net.ort.onnx")), "--model", "lightning_models:LitClassifier",
                   "--checkpoint", str(checkpoint)])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and lines.count("  ok") == 2
    assert sum(line.startswith("  against the checkpoint: max |ORT − PyTorch| ") for line in lines) == 2


def test_changed_weights_pass_without_the_model_and_fail_with_it(checkpoint_export, tmp_path, capsys):
    out, checkpoint = checkpoint_export
    path = pair(out, tmp_path)
    tamper_graph(path, lambda m: set_array(m, "model.fc1.weight_quantized", lambda a: (-a - 1).astype(a.dtype)))  # int4: -8..7 → 7..-8
    assert verify(path, capsys) == (0, [], "")
    status, problems, err = verify(path, capsys, "--model", "lightning_models:LitClassifier", "--checkpoint", str(checkpoint))
    assert (status, err, len(problems)) == (1, "", 1)
    assert re.fullmatch(r"ONNX Runtime differs from the PyTorch model: the largest difference is [0-9.e+-]+ \(largest output [0-9.e+-]+\), "
                        r"allowed 5%; the file does not compute what this checkpoint does", problems[0]), problems[0]


def test_model_without_checkpoint_is_an_error(checkpoint_export, capsys):
    out, _ = checkpoint_export
    assert verify(out, capsys, "--model", "lightning_models:LitClassifier") == (
        2, [], "error: --model and --checkpoint go together: the model class to rebuild and the checkpoint to load into it\n")


def test_a_checkpoint_of_another_model_is_one_line(checkpoint_export, tmp_path, capsys):
    out, checkpoint = checkpoint_export
    saved = torch.load(checkpoint, weights_only=True)
    state = saved["state_dict"]
    for key in [k for k in state if k.startswith("model.fc2.")]:  # a model with another head
        state[key.replace("fc2", "head")] = state.pop(key)
    other = tmp_path / "other.ckpt"
    torch.save(saved, other)
    status, problems, err = verify(out, capsys, "--model", "lightning_models:LitClassifier", "--checkpoint", str(other))
    assert (status, problems) == (2, []) and err.count("\n") == 1, err
    quantizer = "input_quantizer._extra_state`, `model.{}.input_quantizer.observer.max_val"
    assert err == (f"error: `{other}` does not fit LitClassifier: 12 missing keys (`model.fc2.bias`, "
                   f"`model.fc2.{quantizer.format('fc2')}`, …), 12 unexpected keys (`model.head.bias`, "
                   f"`model.head.{quantizer.format('head')}`, …); is it a checkpoint of this "
                   "model class (and --init-args)?\n")


def test_a_model_that_does_not_take_the_recorded_inputs(exported):
    model = qat.prepare(torch.nn.Sequential(torch.nn.Linear(5, 2)), {"weight": {"bits": 4}})
    model(torch.randn(4, 5))
    with pytest.raises(qat.QATError, match=re.escape("Sequential does not take the inputs `cnn.onnx` records (x): mat1 and mat2 shapes "
                                                     "cannot be multiplied")):
        verify_against_model(exported.path, model)


def test_a_sidecar_that_is_not_utf8_or_a_folder(exported, tmp_path, capsys):
    path = pair(exported.path, tmp_path)
    sidecar_path(path).write_bytes(b"\xff{}")
    assert verify(path, capsys) == (2, [], f"error: cannot read calibration metadata file `{sidecar_path(path)}`: not UTF-8 text "
                                           "(byte 0xff on line 1); save it as UTF-8\n")
    sidecar_path(path).unlink()
    sidecar_path(path).mkdir()
    assert verify(path, capsys) == (2, [], f"error: `{sidecar_path(path)}` is a folder, not a calibration metadata file\n")
    assert verify(tmp_path, capsys) == (2, [], f"error: `{tmp_path}` is a folder, not an ONNX model\n")
