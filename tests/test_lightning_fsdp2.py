"""The QAT callback under FSDP2 (Lightning's ModelParallelStrategy, 2 CPU ranks, gloo), for a tiny Llama
and a small CNN with folded BatchNorms:

- every rank holds the same quantizer state (and BatchNorm statistics) after every step;
- losses and final weights match one process training on the same global batch;
- a run resumed in new processes from a sharded (Llama) or full (CNN) checkpoint ends bit for bit
  where the uninterrupted run ended;
- ``qat.lightning.load_checkpoint`` builds the model from either checkpoint, and its export verifies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning_models import LitClassifier, LitLlama, TokenData, image_data, trainer
from test_lightning_resume import _equal

import qat
from qat.app.cli import main
from qat.lightning import QuantizationAwareTraining, load_checkpoint

SCRIPT = Path(__file__).parent / "lightning_scripts" / "sharded.py"
sys.path.insert(0, str(SCRIPT.parent))
from sharded import RESUMED, RUNS, Recorder  # noqa: E402

WEIGHT_ATOL = {"llama-affine": 1e-4, "cnn-frozen-bn": 1e-6}
"""Final weights and quantizer state against one process (test_matches_one_process_on_the_global_batch says why)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both 2-rank scripts run once for every test of this file (about 30 s)."""
    folder = tmp_path_factory.mktemp("fsdp2")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    for mode in ("fit", "resume"):
        done = subprocess.run([sys.executable, str(SCRIPT), mode, str(folder)], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return folder


def single_process(kind: str) -> tuple[Recorder, pl.LightningModule]:
    """The same run in one process, with each step's batch the two ranks' batches together."""
    _, arguments, recipe, schedule, _, _ = RUNS[kind]
    pl.seed_everything(0, verbose=False)
    module = LitLlama(batch_size=16, **arguments) if kind.startswith("llama") else LitClassifier(batch_size=32, **arguments)
    recorder = Recorder()
    trainer(max_epochs=3, limit_val_batches=1,
            callbacks=[QuantizationAwareTraining(recipe, schedule=schedule, print_summary=False), recorder]).fit(module)
    return recorder, module


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RUNS))
def test_ranks_agree_after_every_step(runs, kind):
    rank0, rank1 = (torch.load(runs / f"{kind}-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(rank0["states"]) == len(rank1["states"]) == 6  # training batches (the accumulating run: 3 steps)
    for step, (a, b) in enumerate(zip(rank0["states"], rank1["states"], strict=True)):
        assert a.keys() == b.keys() and any(k.endswith("weight_quantizer.observer.min_val") for k in a)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{kind} step {step}: {key} differs between ranks"
    if kind == "cnn":  # the BatchNorm statistics trained (averaged over the ranks), and were folded
        assert not torch.equal(rank0["states"][-1]["model.conv1.bn.running_var"], torch.ones(8))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-affine", "cnn-frozen-bn"])
def test_matches_one_process_on_the_global_batch(runs, kind):
    """The two runs sum each gradient in another order (the ranks' halves, then their mean). Where a value lies within
    that float noise of a rounding boundary (half a step; an affine zero point), it takes the other code in the other
    run, and the runs part by more than float noise from there. The Llama, with per-token activations, meets such values
    (measured after 6 steps: losses 2.6e-6 apart relatively, weights of up to 0.2 by 3.7e-5); the CNN did not (1.5e-8)."""
    rank0, rank1 = (torch.load(runs / f"{kind}-rank{r}.pt", weights_only=True) for r in (0, 1))
    final = torch.load(runs / f"{kind}-final.pt", weights_only=True)["model"]
    recorder, module = single_process(kind)
    for step, loss in enumerate(recorder.losses):
        sharded = (rank0["losses"][step] + rank1["losses"][step]) / 2
        assert torch.allclose(sharded, loss, rtol=1e-5, atol=1e-6), (kind, step, float(sharded), float(loss))
    for key, value in module.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.allclose(final[key], value, rtol=1e-5, atol=WEIGHT_ATOL[kind]), (key, float((final[key] - value).abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", RESUMED)
def test_resume_from_a_sharded_or_full_checkpoint_is_bit_identical(runs, kind):
    uninterrupted = torch.load(runs / f"{kind}-final.pt", weights_only=True)
    resumed = torch.load(runs / "resumed" / f"{kind}-final.pt", weights_only=True)
    _equal(uninterrupted["model"], resumed["model"], "model")
    _equal(uninterrupted["optimizer"], resumed["optimizer"], "optimizer")


@pytest.mark.slow
@pytest.mark.parametrize("kind", RESUMED)
def test_load_checkpoint_gathers_the_run_and_its_export_verifies(runs, kind, tmp_path):
    """The last checkpoint, a folder of shards (Llama) or one full file (CNN), loaded in one process without a process
    group, is the run's final state; its ONNX export verifies in ONNX Runtime."""
    checkpoint = next((runs / kind).glob("epoch=2-*"))
    assert checkpoint.is_dir() == (kind == "llama")
    module = load_checkpoint(LitLlama() if kind == "llama" else LitClassifier(), checkpoint)
    final = torch.load(runs / f"{kind}-final.pt", weights_only=True)["model"]
    _equal({k: v for k, v in final.items() if isinstance(v, torch.Tensor)},
           {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}, "model")
    assert module.model.lm_head.weight_quantizer.observer_enabled if kind == "llama" else module.model.conv1.bn_frozen
    if kind == "cnn":
        result = qat.export_onnx(module.eval(), (image_data(4, seed=3).tensors[0],), tmp_path / "cnn.onnx", artifacts=["ort"])
        assert result.ort.path.is_file() and result.ort.integer_weights  # export_onnx raises when ORT parts from PyTorch
    else:  # the command line, from the folder of shards
        inputs = tmp_path / "inputs.pt"
        torch.save({"input_ids": TokenData(2, seed=3).ids}, inputs)
        assert main(["export", "--model", "lightning_models:LitLlama", "--checkpoint", str(checkpoint), "--inputs", str(inputs),
                     "-o", str(tmp_path / "llama.onnx"), "--artifacts", "ort"]) == 0
        assert (tmp_path / "llama.ort.onnx").is_file()
