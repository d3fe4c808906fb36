"""An export that cannot be fooled and is written as a unit: non-finite models and outputs, a
top-1 disagreement, paths that cannot be written or that leave the run's folder, and a process
killed between the renames of the artifact set. Each bad input gets one exact line."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import qat
from qat.app.cli import main
from qat.errors import QATError
from qat.export import exporter, parity
from qat.export.exporter import check_finite_state, check_write_target
from qat.lightning import ONNXExport

SCRIPTS = Path(__file__).parent / "export_scripts"
REFUSE_BN = ("a non-finite batch reached BatchNorm during training; load a checkpoint from before it, or keep such batches out "
             "of training")
DIVERGED = "training diverged; load a checkpoint from before it, or train with a lower learning rate"
TORCH_NAN = ("the model computes non-finite values on these inputs, so ONNX Runtime cannot be checked against it; check the "
             "inputs and the model's weights")
ORT_NAN = "where PyTorch's is finite: the exported graph does not compute what the model does"


def calibrated_mlp(seed: int = 0) -> nn.Module:
    """64 → 32 → 10 with int4 weights, calibrated on three random batches."""
    torch.manual_seed(seed)
    model = qat.prepare(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), {"weight": {"bits": 4}})
    for _ in range(3):
        model(torch.randn(8, 64))
    return model


def conv_bn_linear() -> nn.Module:
    """Conv+BN (folded) + Linear, calibrated."""
    x = torch.randn(4, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    qat.prepare(model, {"weight": {"bits": 4}}, example_inputs=x)
    for _ in range(3):
        model(torch.randn_like(x))
    return model


@pytest.fixture
def no_tracing(monkeypatch):
    """Tracing fails the test: a bad input must be refused before it."""

    def traced(*args, **kwargs):
        raise AssertionError("the model was traced")

    monkeypatch.setattr(exporter, "_trace", traced)


def exported_logs(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "qat.export.exporter"]


def refused(message: str):
    return pytest.raises(QATError, match=f"^{re.escape(message)}$")


# -- non-finite models ----------------------------------------------------------------------------


def test_one_nan_in_a_training_batch_poisons_batchnorm_and_the_export_names_it(tmp_path, no_tracing):
    model = conv_bn_linear()
    batch = torch.randn(4, 3, 8, 8)
    batch[0, 0, 0, 0] = float("nan")  # one element
    model.train()(batch)
    assert all(torch.isfinite(q.scale).all() for _, q in qat.quantizers(model))  # the scales stay finite, as documented
    with refused(f"cannot export Sequential: `0.bn.running_mean` holds NaN (8 of 8 values): {REFUSE_BN} "
                 "(also non-finite: `0.bn.running_var`)"):
        qat.export_onnx(model, torch.randn(4, 3, 8, 8), tmp_path / "net.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_inf_weight_is_refused_naming_the_parameter(tmp_path, no_tracing):
    model = calibrated_mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = float("inf")
    with refused(f"cannot export Sequential: `2.weight` holds Inf (1 of 320 values): {DIVERGED}"):
        qat.export_onnx(model, torch.randn(8, 64), tmp_path / "net.onnx")


def test_a_diverged_learnable_scale_is_refused(tmp_path, no_tracing):
    torch.manual_seed(0)
    model = qat.prepare(nn.Sequential(nn.Linear(16, 4)), {"weight": {"bits": 4, "learnable": True}})
    model(torch.randn(8, 16))
    with torch.no_grad():
        model[0].weight_quantizer.scale[1] = float("nan")
    with refused(f"cannot export Sequential: `0.weight_quantizer.scale` holds NaN (1 of 4 values): {DIVERGED}"):
        qat.export_onnx(model, torch.randn(8, 16), tmp_path / "net.onnx")


def test_observer_ranges_and_infinite_masks_are_not_flagged():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))  # an additive causal mask

        def forward(self, x):
            return self.fc(x) + self.mask

    model = qat.prepare(Masked())  # never calibrated: every observer range is still (+inf, -inf)
    assert torch.isinf(model.fc.input_quantizer.observer.min_val).all()
    check_finite_state(model)
    model.mask[0, 0] = float("nan")
    with refused("cannot export Masked: `mask` holds NaN (1 of 16 values): the exported graph would compute with it"):
        check_finite_state(model)


# -- non-finite or disagreeing outputs --------------------------------------------------------------


def test_ort_output_all_nan_but_one_is_a_failure_not_a_zero_difference():
    reference = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    got = np.full_like(reference, np.nan)
    got[0, 0] = reference[0, 0]
    with refused(f"ONNX Runtime's output `output` holds NaN (39 of 40 values) {ORT_NAN}"):
        parity.compare([[got]], [[reference]], [{}])


def test_nan_only_in_pytorch_is_named_as_pytorch():
    reference = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    got = reference.copy()
    reference[1, :3] = np.nan
    with refused(f"PyTorch's output `output` holds NaN (3 of 40 values): {TORCH_NAN}"):
        parity.compare([[got]], [[reference]], [{}])


def test_inf_in_a_second_output_of_a_second_batch_names_both():
    a, b = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    bad = b.copy()
    bad[1, 2] = -np.inf
    with refused(f"ONNX Runtime's output `scores` holds Inf (1 of 6 values) in batch 2 of 2 {ORT_NAN}"):
        parity.compare([[a, b], [a, bad]], [[a, b], [a, b]], [{}, {}], output_names=["logits", "scores"])


def test_top1_disagreement_below_the_threshold_fails():
    reference = np.tile(np.array([[1.0, 0.98, 0.0, -1.0]], np.float32), (10, 1))
    got = reference.copy()
    got[:4, 1] = 1.02  # four rows of ten flip, each by 0.04: within 5 % of the largest output
    judged = parity.compare([[got]], [[reference]], [{}])
    assert judged.top1_agreement == pytest.approx(0.6) and judged.max_abs_diff <= 0.05 * judged.output_scale
    assert not judged.within(0.05)
    assert judged.failure(0.05) == "ORT picks PyTorch's top-1 class in 60.0% of the rows, allowed at least 90%"
    assert judged.within(0.05, min_top1=0.6) and judged.within(0.25)  # 1 − 2·0.25 = 0.5


def test_ort_nan_in_a_real_export_fails_and_writes_nothing(tmp_path, monkeypatch):
    run = parity.run_session

    def nan_but_one(session, feeds):
        outputs = run(session, feeds)
        poisoned = np.full_like(outputs[0], np.nan)
        poisoned.flat[0] = outputs[0].flat[0]
        return [poisoned]

    monkeypatch.setattr(parity, "run_session", nan_but_one)
    target = tmp_path / "net.onnx"
    with refused(f"ONNX Runtime's output `output` holds NaN (79 of 80 values) {ORT_NAN}; `{target}` was not written"):
        qat.export_onnx(calibrated_mlp(), torch.randn(8, 64), target)
    assert list(tmp_path.iterdir()) == []


def test_a_nan_input_fails_as_pytorch_output(tmp_path):
    x = torch.randn(8, 64)
    x[1, 3] = float("nan")
    target = tmp_path / "net.onnx"
    with refused(f"PyTorch's output `output` holds NaN (10 of 80 values): {TORCH_NAN}; `{target}` was not written"):
        qat.export_onnx(calibrated_mlp(), x, target)


def test_inputs_without_samples_are_refused_before_tracing(tmp_path, no_tracing):
    with refused("example_inputs: input 0 has no elements (shape (0, 64)); give at least one sample"):
        qat.export_onnx(calibrated_mlp(), torch.randn(0, 64), tmp_path / "net.onnx")
    with refused("verification_inputs[1]: input 0 has no elements (shape (0, 64)); give at least one sample"):
        qat.export_onnx(calibrated_mlp(), torch.randn(8, 64), tmp_path / "net.onnx",
                        verification_inputs=[torch.randn(8, 64), torch.randn(0, 64)])


# -- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["../../elsewhere/x.onnx", "runs/../../x.onnx"])
def test_onnx_export_path_may_not_climb_out_of_the_run_folder(path):
    with refused(f"ONNXExport path `{path}` climbs out of the run's folder (the Trainer's default_root_dir); give an absolute "
                 "path if that is really meant"):
        ONNXExport(path)


def test_onnx_export_paths_inside_the_run_folder_or_absolute_are_taken(tmp_path):
    assert ONNXExport("runs/../model.onnx").path == Path("runs/../model.onnx")
    assert ONNXExport(tmp_path / ".." / "model.onnx").path.is_absolute()


def test_onnx_export_checks_its_path_before_training(tmp_path):
    from lightning_models import CNN_RECIPE, LitClassifier, trainer

    (tmp_path / "x.onnx").mkdir()
    run = trainer(max_steps=4, limit_val_batches=0, default_root_dir=tmp_path,
                  callbacks=[qat.lightning.QuantizationAwareTraining(CNN_RECIPE, print_summary=False), ONNXExport("x.onnx")])
    with refused(f"cannot write `{tmp_path / 'x.onnx'}`: `{tmp_path / 'x.onnx'}` is a folder"):
        run.fit(LitClassifier())
    assert run.global_step == 0


def test_a_folder_in_the_place_of_the_model_is_refused(tmp_path, no_tracing):
    (tmp_path / "x.onnx").mkdir()
    with refused(f"cannot write `{tmp_path / 'x.onnx'}`: `{tmp_path / 'x.onnx'}` is a folder"):
        qat.export_onnx(calibrated_mlp(), torch.randn(8, 64), tmp_path / "x.onnx")


def test_a_folder_in_the_place_of_a_sidecar_is_refused(tmp_path, no_tracing):
    (tmp_path / "x.ort.qparams.json").mkdir()
    with refused(f"cannot write `{tmp_path / 'x.onnx'}`: `{tmp_path / 'x.ort.qparams.json'}` is a folder"):
        qat.export_onnx(calibrated_mlp(), torch.randn(8, 64), tmp_path / "x.onnx")
    assert check_write_target(tmp_path / "x.onnx", ["device"]) == tmp_path / "x.onnx"  # not one of its files


def test_a_file_in_the_place_of_the_folder_is_refused(tmp_path, no_tracing):
    (tmp_path / "runs").write_text("a file")
    with refused(f"cannot write `{tmp_path / 'runs' / 'x.onnx'}`: `{tmp_path / 'runs'}` is not a folder"):
        qat.export_onnx(calibrated_mlp(), torch.randn(8, 64), tmp_path / "runs" / "x.onnx")


@pytest.mark.parametrize(("path", "folder"), [("/proc/x.onnx", "/proc"), ("/sys/net.onnx", "/sys")])
def test_a_folder_where_no_file_can_be_created_is_refused(path, folder, no_tracing):
    # root ignores permission bits, and /proc, /sys take no new file: only trying tells; the reason is the OS's
    with pytest.raises(QATError, match=f"^{re.escape(f'cannot write `{path}`: the folder `{folder}` is not writable (')}[^()]+\\)$"):
        qat.export_onnx(calibrated_mlp(), torch.randn(8, 64), path)


# -- the CLI: one line, exit status 2, before the checkpoint is read -------------------------------


def cli_export(output: str) -> int:
    return main(["export", "--model", "lightning_models:LitClassifier", "--checkpoint", "last.ckpt", "--input-shape", "2,3,8,8",
                 "-o", output])


@pytest.mark.parametrize(("output", "message"), [
    ("/sys/net.onnx", "cannot write `/sys/net.onnx`: the folder `/sys` is not writable ("),
    ("/proc/x.onnx", "cannot write `/proc/x.onnx`: the folder `/proc` is not writable ("),
    ("{tmp}/x.onnx", "cannot write `{tmp}/x.onnx`: `{tmp}/x.onnx` is a folder"),
    ("{tmp}/missing/x.onnx", "cannot write `{tmp}/missing/x.onnx`: the folder `{tmp}/missing` does not exist"),
    ("{tmp}/x.pt", "export path `{tmp}/x.pt` must end in .onnx"),
])
def test_cli_export_refuses_a_bad_output_in_one_line_before_any_work(output, message, tmp_path, capsys, monkeypatch, no_tracing):
    (tmp_path / "x.onnx").mkdir()
    monkeypatch.setattr("qat.lightning.load_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was read"))
    started = time.perf_counter()
    assert cli_export(output.format(tmp=tmp_path)) == 2
    assert time.perf_counter() - started < 1.0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    expected = f"error: {message.format(tmp=tmp_path)}"
    assert lines[0].startswith(expected) if expected.endswith("(") else lines[0] == expected


# -- the artifact set as a unit ---------------------------------------------------------------------


def test_the_next_export_removes_what_an_interrupted_one_left(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    leftovers = [".net.onnx.tmp", f".net.ort.qparams.json.{dead.stdout.strip()}.tmp"]
    live = f".net.qparams.json.{os.getppid()}.tmp"  # a running process's: another export at work, left alone
    for name in [*leftovers, live, ".other.onnx.tmp"]:
        (tmp_path / name).write_text("partial")
    with caplog.at_level(logging.WARNING, logger="qat.export.exporter"):
        qat.export_onnx(calibrated_mlp(), torch.randn(8, 64), tmp_path / "net.onnx")
    assert exported_logs(caplog) == [f"removed 2 temporary files an interrupted export left in `{tmp_path}`: {', '.join(leftovers)}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, ".other.onnx.tmp", "net.onnx", "net.ort.onnx",
                                                                 "net.ort.qparams.json", "net.qparams.json"])


@pytest.mark.slow
def test_killed_between_renames_verify_names_the_member_and_the_next_export_recovers(tmp_path, capsys, caplog):
    target = tmp_path / "net.onnx"
    qat.export_onnx(calibrated_mlp(0), torch.randn(8, 64), target)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    killed = subprocess.run([sys.executable, str(SCRIPTS / "kill_between_renames.py"), str(target), "1"], capture_output=True,
                            text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    pid = next(re.fullmatch(r"\.net\.ort\.onnx\.(\d+)\.tmp", name) for name in files if name.startswith(".net.ort.onnx."))[1]
    temporaries = [f".{name}.{pid}.tmp" for name in ("net.ort.onnx", "net.qparams.json", "net.ort.qparams.json")]  # not yet renamed
    assert sorted(name for name in files if name.endswith(".tmp")) == sorted(temporaries)
    assert files["net.onnx"] != before["net.onnx"]  # the first rename: the new device model ...
    for name in ("net.qparams.json", "net.ort.onnx", "net.ort.qparams.json"):  # ... beside the old rest of the set
        assert files[name] == before[name]

    assert main(["verify", str(target), str(tmp_path / "net.ort.onnx")]) == 1
    out = capsys.readouterr().out
    assert "  problem: `net.onnx` is not the file the metadata describes (sha256 differs)" in out.splitlines()
    assert out.count("  ok") == 1 and out.count("  FAILED") == 1

    with caplog.at_level(logging.WARNING, logger="qat.export.exporter"):
        qat.export_onnx(calibrated_mlp(1), torch.randn(8, 64), target)
    assert exported_logs(caplog) == [f"removed 3 temporary files an interrupted export left in `{tmp_path}`: {', '.join(temporaries)}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.ort.onnx", "net.ort.qparams.json", "net.qparams.json"]
    assert main(["verify", str(target), str(tmp_path / "net.ort.onnx")]) == 0
    assert json.loads((tmp_path / "net.qparams.json").read_text())["verification"]["min_top1"] == 0.9
