"""`qat run` (float → PTQ → QAT → export → verification → results) and `qat compare` (the CI gate)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import qat
from qat.app.cli import main
from qat.app.compare import Limits, compare
from qat.app.results import load_results
from qat.errors import QATError
from qat.training.batches import rebatch

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path, **trainer) -> str:
    """A recipe small enough for a test: timm's 0.37M-parameter test ResNet on 8×8 digits at 16 px."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2, "limit_train_batches": 15, "limit_val_batches": 1, "accelerator": "cpu", "devices": 1,
            "logger": False, "enable_progress_bar": False, "enable_model_summary": False, **trainer,
            "callbacks": [
                {"class_path": "qat.lightning.QuantizationAwareTraining",
                 "init_args": {"recipe": {"weight": {"bits": 4}}, "schedule": {"calibrate_from": 0, "fake_quant_from": 2},
                               "print_summary": False}},
                {"class_path": "qat.lightning.ONNXExport", "init_args": {"path": "digits.onnx", "dynamic_batch": True}},
            ],
        },
        "model": {"class_path": "qat.app.tasks.ImageClassifier",
                  "init_args": {"model": "timm.test_resnet", "num_classes": 10, "in_chans": 1, "optimizer": "adamw", "lr": 0.01}},
        "data": {"class_path": "qat.app.data.DigitsDataModule", "init_args": {"batch_size": 32, "image_size": 16}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    assert main(["run", tiny_recipe(tmp), "--out", str(out), "--calibration-batches", "3", "--latency-runs", "2"]) == 0
    return out


def test_run_writes_results_with_every_stage_and_verified_artifacts(run):
    results = load_results(run / "results.json")
    assert results["metric"] == {"name": "test_acc", "higher_is_better": True}
    assert set(results["stages"]) == {"float", "ptq", "qat"}
    for stage in results["stages"].values():
        assert 0.0 <= stage["metric"] <= 1.0
    assert results["stages"]["float"]["metric"] > 0.5  # 30 steps on real digits: far above chance
    assert results["stages"]["ptq"]["calibration_batches"] == 3
    assert results["stages"]["qat"]["overrides"] == ["--trainer.max_epochs=1", "--model.init_args.lr=0.001"]
    assert set(results["artifacts"]) == {"device", "ort"}
    for kind, entry in results["artifacts"].items():
        assert entry["verified"] and entry["problems"] == []
        assert (run / ("digits.onnx" if kind == "device" else "digits.ort.onnx")).is_file()
        assert entry["qparams"].endswith(".qparams.json") and entry["latency_ms"] > 0
        assert entry["top1_agreement"] >= 0.95
    assert results["verified_inputs"] == 179  # the whole test split (dynamic batch: nothing left out)
    assert results["artifacts"]["device"]["bytes"] < 0.2 * results["stages"]["float"]["bytes"]
    markdown = (run / "results.md").read_text()
    assert "| QAT, ort |" in markdown and "tiny.yaml" in markdown


def test_ptq_is_calibration_only(run):
    """The PTQ row is the float model with ranges observed: its accuracy differs from float only by quantization."""
    results = load_results(run / "results.json")
    assert abs(results["stages"]["ptq"]["metric"] - results["stages"]["float"]["metric"]) < 0.3


def test_compare_passes_against_itself_and_names_each_regression(run, tmp_path, capsys):
    path = run / "results.json"
    assert main(["compare", str(path), "--baseline", str(path)]) == 0
    assert "no regression" in capsys.readouterr().out

    worse = json.loads(path.read_text())
    worse["stages"]["qat"]["metric"] *= 0.9
    worse["artifacts"]["ort"]["bytes"] = int(worse["artifacts"]["ort"]["bytes"] * 1.1)
    worse["artifacts"]["device"]["latency_ms"] *= 2
    worse["artifacts"]["device"]["top1_agreement"] -= 0.02
    changed = tmp_path / "worse.json"
    changed.write_text(json.dumps(worse))
    assert main(["compare", str(changed), "--baseline", str(path)]) == 1
    out = capsys.readouterr().out
    assert "regressed: QAT test_acc, device: ORT = PyTorch top-1, ort: bytes" in out  # latency: reported, not gated
    assert main(["compare", str(changed), "--baseline", str(path), "--max-latency-increase", "25"]) == 1
    out = capsys.readouterr().out
    assert "regressed: QAT test_acc, device: ORT = PyTorch top-1, device: ORT latency ms, ort: bytes" in out

    # generous limits let the same run through
    assert main(["compare", str(changed), "--baseline", str(path), "--max-metric-drop", "11", "--max-size-increase", "11",
                 "--max-latency-increase", "101", "--max-agreement-drop", "2.5"]) == 0


def test_compare_direction_follows_the_metric():
    base = {"version": 1, "recipe": "r", "metric": {"name": "test_ppl", "higher_is_better": False},
            "stages": {"float": {"metric": 10.0}, "ptq": {"metric": 14.0}, "qat": {"metric": 11.0}},
            "artifacts": {"ort": {"bytes": 100, "verified": True, "top1_agreement": None, "latency_ms": 1.0,
                                  "perplexity": {"torch": 11.0, "onnx": 11.0, "delta": 0.0}}}}
    better, worse = copy.deepcopy(base), copy.deepcopy(base)
    better["stages"]["qat"]["metric"] = 10.5
    worse["stages"]["qat"]["metric"] = 11.5  # 4.5 % higher perplexity
    worse["artifacts"]["ort"]["perplexity"]["onnx"] = 11.5
    assert all(check.ok for check in compare(better, base))
    failed = [check.measure for check in compare(worse, base, Limits(max_metric_drop=2.0)) if not check.ok]
    assert failed == ["QAT test_ppl", "ort: ORT perplexity"]


def test_compare_bad_input_names_the_file_and_key(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"version": 1}))
    assert main(["compare", str(tmp_path / "missing.json"), "--baseline", str(good)]) == 2
    assert "missing.json` does not exist" in capsys.readouterr().err
    assert main(["compare", str(good), "--baseline", str(good)]) == 2
    assert "good.json` is not a qat run results file" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"version": 1, "recipe": "r", "metric": {"name": "a", "higher_is_better": True},
                                  "stages": {"float": {"metric": 1}, "ptq": {"metric": 1}, "qat": {"metric": "high"}},
                                  "artifacts": {"ort": {"bytes": 1, "verified": True, "top1_agreement": None, "perplexity": None,
                                                        "latency_ms": 1.0}}}))
    with pytest.raises(QATError, match=r"at `stages.qat.metric`: 'high' is not of type 'number'"):
        load_results(broken)


def test_run_stages_an_llm_recipe_into_an_onnxruntime_genai_folder(tmp_path):
    """A recipe with GenaiFolderExport: QAT ends in an onnxruntime-genai folder (the ``genai``
    artifact), its layers on n-bit kernels, its greedy continuations of test sequences equal to
    PyTorch's, its decode loop timed; no ONNXExport artifact is added."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 6, "limit_val_batches": 1, "limit_test_batches": 2, "accelerator": "cpu", "devices": 1, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
            "callbacks": [
                {"class_path": "qat.lightning.QuantizationAwareTraining",
                 "init_args": {"recipe": {"weight": {"bits": 4, "granularity": "per_group", "group_size": 32, "extreme_on_grid": True},
                                          "activation": {"bits": 8, "signed": True, "symmetric": True, "narrow_range": True,
                                                         "granularity": "per_token", "group_size": 32}},
                               "schedule": {"calibrate_from": 0, "fake_quant_from": 1}, "print_summary": False}},
                {"class_path": "qat.lightning.GenaiFolderExport", "init_args": {"folder": "genai"}},  # the data's tokenizer
            ],
        },
        "model": {"class_path": "qat.app.tasks.CausalLanguageModel",
                  "init_args": {"model": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": 512,
                                          "max_position_embeddings": 128}, "lr": 0.003}},
        "data": {"class_path": "qat.app.data.TextDataModule",
                 "init_args": {"source": "stdlib", "tokenizer": "bpe", "vocab_size": 512, "seq_len": 32, "batch_size": 8,
                               "max_chars": 300_000, "cache_dir": str(tmp_path / "cache")}},
    }
    recipe = tmp_path / "tiny_llm.yaml"
    recipe.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--calibration-batches", "2"]) == 0
    results = load_results(out / "results.json")
    assert results["metric"]["name"] == "test_ppl" and set(results["artifacts"]) == {"genai"}
    entry = results["artifacts"]["genai"]
    assert (out / "genai" / "genai_config.json").is_file() and entry["verified"] and entry["latency_ms"] > 0
    # verified on test sequences, whose perplexity is below a uniform guess over the 512 tokens (random tokens' is above it)
    assert entry["perplexity"]["torch"] < 512 and abs(entry["perplexity"]["delta"]) < 1e-3 * entry["perplexity"]["torch"]
    assert entry["float_layers"] == [] and entry["kernels"] == {"MatMulNBits": 15, "GatherBlockQuantized": 1}  # 7 per layer and the head
    generation = entry["generation"]
    assert [len(p) for p in generation["prompts"]] == [16, 16] and generation["runtime"] == generation["pytorch"]
    assert generation["agreeing"] == [len(tokens) for tokens in generation["pytorch"]] and min(generation["agreeing"]) > 0
    assert results["verified_inputs"] == 2 and "| QAT, genai |" in (out / "results.md").read_text()
    assert not list(out.glob("*.onnx"))


def test_run_rejects_a_recipe_without_the_callback(tmp_path, capsys):
    pytest.importorskip("sklearn")
    recipe = yaml.safe_load((tmp_path / tiny_recipe(tmp_path)).read_text())
    recipe["trainer"]["callbacks"] = []
    path = tmp_path / "nocallback.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "must have one qat.lightning.QuantizationAwareTraining callback" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml` does not exist" in capsys.readouterr().err
    assert main(["run", str(path), "--qat-lr-scale", "0"]) == 2
    assert "qat_lr_scale must be positive" in capsys.readouterr().err


def test_calibrate_observes_then_freezes():
    torch.manual_seed(0)
    model = qat.prepare(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), {"weight": {"bits": 4}})
    batches = [(torch.randn(8, 4), torch.zeros(8)) for _ in range(5)]
    assert qat.calibrate(model, batches, num_batches=3) == 3
    states = [(q.fake_quant_enabled, q.observer_enabled, q.calibrated) for _, q in qat.quantizers(model)]
    assert states and all(state == (True, False, True) for state in states)
    assert model.training  # restored
    with pytest.raises(QATError, match="no batches"):
        qat.calibrate(model, [])


def test_calibrate_feeds_mappings_as_keywords_without_labels():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    model = qat.prepare(Keyword(), {"weight": {"bits": 8}})
    qat.calibrate(model, [{"x": torch.randn(2, 3), "labels": torch.zeros(2)}])
    assert all(q.calibrated for _, q in qat.quantizers(model))


def test_rebatch_cuts_to_a_fixed_size_and_keeps_structure():
    batches = [{"a": torch.arange(5), "b": torch.zeros(5, 2)}, {"a": torch.arange(5, 9), "b": torch.ones(4, 2)}]
    cut = rebatch(batches, 4)
    assert [b["a"].tolist() for b in cut] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert cut[1]["b"].shape == (4, 2)
    with pytest.raises(QATError, match="same structure"):
        rebatch([torch.zeros(2), (torch.zeros(2),)], 1)


def test_the_shipped_baseline_is_a_valid_results_file():
    """The CI step in docs/guide/ci.md compares against it."""
    baseline = load_results(ROOT / "benchmarks" / "baselines" / "resnet18_mnist5k_w4a8.json")
    assert baseline["recipe"] == "recipes/vision/resnet18_mnist5k_w4a8.yaml"
    assert all(check.ok for check in compare(baseline, baseline))
