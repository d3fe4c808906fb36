"""`qat run`: one recipe from a float baseline to verified ONNX artifacts, and the table it is judged by.

A recipe is a plain LightningCLI config (model, data, a trainer with the
:class:`~qat.lightning.QuantizationAwareTraining` callback, optionally
:class:`~qat.lightning.ONNXExport`). :func:`run_recipe` runs it in stages, each a Lightning run
of the recipe's own model, data and trainer:

1. **float**: the recipe without its quantization callbacks, for the trainer's length; tested.
   A task whose model starts trained says so with ``needs_float_training = False`` (the
   distillation student, a copy of its teacher) and is only tested.
2. **PTQ**: the float model prepared with the same quantizers (the callback's recipe) and
   calibrated on ``calibration_batches`` training batches (:func:`qat.calibrate`); no weight
   changes; tested.
3. **QAT**: the module rebuilt with the float weights and fine-tuned with the recipe's callbacks
   (schedule included) for ``qat_fraction`` of the float run, at ``qat_lr_scale`` × the recipe's
   learning rate; tested.
4. **export**: ONNXExport at the end of QAT writes both artifacts, compared with PyTorch on the
   test split in ONNX Runtime (cut into batches of the graph's fixed size, the incomplete last
   batch left out); each is re-checked by :func:`qat.export.verify.verify_artifact`
   and timed. A recipe with :class:`~qat.lightning.GenaiFolderExport` (and no ONNXExport) writes
   an onnxruntime-genai folder instead (the ``genai`` artifact), whose greedy continuations of
   the first test sequences are checked against PyTorch and whose decode loop is timed.
5. ``results.json`` and ``results.md`` in the output folder; the table printed.

``qat compare`` (:mod:`qat.app.compare`) gates a later ``results.json`` against a baseline.

Example::

    from qat.app.run import RunSettings, run_recipe
    results = run_recipe("recipes/vision/resnet18_mnist5k_w4a8.yaml", RunSettings(output_dir="runs/r18"))
    print(results["stages"]["qat"]["metric"])
"""

from __future__ import annotations

import copy
import datetime
import io
import math
import os
import platform
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import onnxruntime
import torch
from rich.console import Console
from torch.utils._pytree import tree_leaves

from qat.app.quiet import args_on_purpose
from qat.app.results import RESULTS_VERSION, results_table, write_results
from qat.atomic import write_atomic
from qat.errors import ConfigError, QATError
from qat.export.exporter import FloatFallbackWarning, load_session
from qat.export.genai import NBIT_OPS, SIDECAR_FILE, check_generation
from qat.export.latency import median_latency_ms
from qat.export.ort_kernels import float_fallback
from qat.export.verify import verify_artifact
from qat.lightning import GenaiFolderExport, ONNXExport, QuantizationAwareTraining
from qat.lightning.checkpoint import read_torch_file
from qat.preparation.prepare import prepare
from qat.text_files import read_text
from qat.training.batches import model_inputs
from qat.training.calibrate import calibrate
from qat.version import __version__


@dataclass
class RunSettings:
    """How :func:`run_recipe` stages a recipe.

    Args:
        output_dir: where logs, checkpoints, artifacts and results go (default ``runs/<recipe name>``).
        qat_fraction: QAT fine-tuning length as a share of the float run, in the recipe's unit
            (``max_steps`` when the trainer sets it, else ``max_epochs``); at least one.
        qat_epochs: QAT length in epochs instead (overrides ``qat_fraction``).
        qat_lr_scale: the QAT learning rate as a multiple of the recipe's ``model.init_args.lr``
            (fine-tuning runs at a lower rate than training from scratch).
        calibration_batches: training batches that PTQ calibrates on.
        latency_runs: timed ONNX Runtime runs per artifact (median reported).
        float_weights: skip float training and start from these weights: an earlier run's
            ``float/float_weights.pt`` (the same float model for several quantization recipes)
            or a Lightning checkpoint of the float model.
    """

    output_dir: str | os.PathLike[str] | None = None
    qat_fraction: float = 0.5
    qat_epochs: int | None = None
    qat_lr_scale: float = 0.1
    calibration_batches: int = 32
    latency_runs: int = 20
    float_weights: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.qat_fraction <= 10:
            raise QATError(f"qat_fraction must be in (0, 10]; got `{self.qat_fraction!r}`")
        if self.qat_epochs is not None and self.qat_epochs < 1:
            raise QATError(f"qat_epochs must be ≥ 1; got `{self.qat_epochs!r}`")
        if not self.qat_lr_scale > 0:
            raise QATError(f"qat_lr_scale must be positive; got `{self.qat_lr_scale!r}`")
        if self.calibration_batches < 1:
            raise QATError(f"calibration_batches must be ≥ 1; got `{self.calibration_batches!r}`")
        if self.latency_runs < 1:
            raise QATError(f"latency_runs must be ≥ 1; got `{self.latency_runs!r}`")


def _lightning_cli(recipe: Path, overrides: Sequence[str]) -> Any:
    """The recipe's model, datamodule and trainer, instantiated by Lightning's own CLI (with the checks of
    :class:`~qat.lightning.cli.QATLightningCLI`)."""
    from qat.lightning.cli import QATLightningCLI

    with args_on_purpose():
        return QATLightningCLI(args=["--config", str(recipe), *overrides], run=False, subclass_mode_model=True,
                               subclass_mode_data=True, save_config_callback=None)


def _split_callbacks(trainer: pl.Trainer, recipe: Path) -> QuantizationAwareTraining:
    """Take the quantization and export callbacks out of ``trainer`` (the float stage runs without
    them) and return the quantization callback."""
    quantizing = [c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
    if len(quantizing) != 1:
        raise QATError(f"recipe `{recipe}` must have one qat.lightning.QuantizationAwareTraining callback under "
                       f"trainer.callbacks; it has {len(quantizing)}")
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, QuantizationAwareTraining | ONNXExport | GenaiFolderExport)]
    return quantizing[0]


GENERATION_PROMPTS, PROMPT_TOKENS, GENERATED_TOKENS = 2, 16, 32
"""The genai artifact's checks: this many test sequences verify the logits, whole and through the
cache, and their first tokens are continued this far."""


def _genai_entry(module: pl.LightningModule, exporting: GenaiFolderExport) -> dict[str, Any]:
    """The ``genai`` artifact's entry: the folder's size, verification and kernels, and a greedy
    generation check against PyTorch on the first tokens of the sequences it was verified on (the
    first test sequences), whose decode loop is timed."""
    result = exporting.result
    generation = check_generation(module, result.folder, exporting.example_ids[:, :PROMPT_TOKENS].tolist(), GENERATED_TOKENS)
    parity = result.parity
    kernels = {name: entry["op"] for name, entry in result.layers.items()}
    return {
        "path": str(result.folder), "qparams": str(result.folder / SIDECAR_FILE), "bytes": result.bytes,
        "verified": True, "problems": [],  # export_genai raises where ONNX Runtime disagrees, whole or cached
        "batches": parity.samples, "max_abs_diff": parity.max_abs_diff, "output_scale": parity.output_scale,
        "top1_agreement": parity.top1_agreement, "perplexity": parity.perplexity, "embedding": None,
        "latency_ms": generation.decode_ms_per_token, "latency_batch": 1, "latency_unit": "ms per new token",
        "layers": len(kernels), "float_layers": [name for name, op in kernels.items() if op not in NBIT_OPS],
        "kernels": dict(Counter(kernels.values())),
        "generation": {"prompts": generation.prompts, "runtime": generation.runtime, "pytorch": generation.pytorch,
                       "agreeing": generation.agreeing},
    }


FLOAT_WEIGHTS = "float_weights.pt"
"""The float stage's trained weights (a state_dict), in ``<output_dir>/float/``."""


def _serialized(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _load_float_weights(module: pl.LightningModule, path: Path) -> None:
    """Float weights from an earlier run's ``float_weights.pt`` or a Lightning checkpoint of the float model."""
    state = read_torch_file(path, "float_weights")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise QATError(f"float_weights `{path}` do not fit the recipe's model: {str(error).splitlines()[0]} …") from None


def quality_metric(module: pl.LightningModule, tested: dict[str, float]) -> tuple[str, bool]:
    """The headline test metric and whether higher is better: the task's ``quality_metric`` /
    ``higher_is_better`` class attributes (the :mod:`qat.app.tasks` modules have them), else the
    first ``test_*`` value the module logged (higher taken as better unless it names a loss or
    perplexity)."""
    name = getattr(module, "quality_metric", None)
    if name is None:
        logged = [key for key in tested if key.startswith("test_")]
        if not logged:
            raise QATError(f"{type(module).__name__} logs no test_* metric in test_step; log one (e.g. self.log('test_acc', …)) "
                           "or set the class attribute quality_metric")
        name = logged[0]
    if name not in tested:
        raise QATError(f"{type(module).__name__}.quality_metric is `{name}` but test_step logged {sorted(tested)}")
    higher = getattr(module, "higher_is_better", not any(word in name for word in ("loss", "ppl", "perplexity")))
    return name, bool(higher)


def _test(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.test(module, datamodule=datamodule, verbose=False)[0].items()}


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def _qat_overrides(trainer: pl.Trainer, cli_config: Any, settings: RunSettings) -> list[str]:
    """LightningCLI overrides that turn the recipe's float run into its QAT fine-tuning run."""
    if settings.qat_epochs is not None:
        length = [f"--trainer.max_epochs={settings.qat_epochs}", "--trainer.max_steps=-1"]
    elif trainer.max_steps and trainer.max_steps > 0:
        length = [f"--trainer.max_steps={max(1, math.ceil(settings.qat_fraction * trainer.max_steps))}"]
    elif trainer.max_epochs and trainer.max_epochs > 0:
        length = [f"--trainer.max_epochs={max(1, round(settings.qat_fraction * trainer.max_epochs))}"]
    else:
        raise QATError("the recipe's trainer sets neither max_epochs nor max_steps; give the QAT length with --qat-epochs")
    lr = getattr(cli_config.model.get("init_args", {}), "lr", None)
    if isinstance(lr, int | float) and settings.qat_lr_scale != 1:
        length.append(f"--model.init_args.lr={lr * settings.qat_lr_scale}")
    return length


def _processor() -> str:
    """The CPU's model name (Linux reports it only in /proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": _processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "lightning": pl.__version__, "onnxruntime": onnxruntime.__version__, "lightning_qat": __version__,
            "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _feeds(session: Any, example: Any) -> list[Any]:
    """The example as ONNX Runtime inputs in the graph's order (keyword inputs by name)."""
    if isinstance(example, Mapping):
        return [example[meta.name].numpy() for meta in session.get_inputs()]
    return [t.numpy() for t in tree_leaves(example)]


def _artifact_entry(artifact: Any, example: Any, settings: RunSettings) -> dict[str, Any]:
    report = verify_artifact(artifact.path)
    session = load_session(artifact.path)
    feeds = _feeds(session, example)
    parity = artifact.parity
    return {
        "path": str(artifact.path), "qparams": str(artifact.qparams_path), "bytes": artifact.bytes,
        "verified": report.ok, "problems": report.problems,
        "batches": parity.samples, "max_abs_diff": parity.max_abs_diff, "output_scale": parity.output_scale,
        "top1_agreement": parity.top1_agreement, "perplexity": parity.perplexity, "embedding": parity.embedding,
        "latency_ms": median_latency_ms(session, feeds, runs=settings.latency_runs), "latency_batch": int(feeds[0].shape[0]),
        "layers": len(artifact.kernels), "float_layers": float_fallback(artifact.kernels),
        "kernels": dict(Counter(artifact.kernels.values())),
    }


def run_recipe(recipe: str | os.PathLike[str], settings: RunSettings | None = None, overrides: Sequence[str] = (),
               console: Console | None = None) -> dict[str, Any]:
    """Float → PTQ → QAT → export → verification of one recipe; writes and returns the results.

    Args:
        recipe: the recipe YAML (a LightningCLI config).
        settings: how to stage it (:class:`RunSettings`).
        overrides: LightningCLI command-line overrides applied to every stage
            (``["--trainer.limit_train_batches=3"]``).
        console: where the table and progress go (default: a new rich console).

    Returns:
        What ``results.json`` holds: per stage the metric and time, per artifact its file,
        size, verification, ONNX Runtime agreement with PyTorch, latency and kernels.
    """
    recipe = Path(recipe)
    if not recipe.exists():
        raise QATError(f"recipe `{recipe}` does not exist")
    read_text(recipe, "recipe file")  # a folder, or not UTF-8: one line, before the output folder is made
    settings = settings or RunSettings()
    console = console or Console()
    out = Path(settings.output_dir or Path("runs") / recipe.stem)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides)
    started = time.perf_counter()
    stages: dict[str, dict[str, Any]] = {}

    # 1. float baseline: the recipe's own run without its quantization callbacks
    console.rule(f"[bold]{recipe.stem}[/]: float baseline")
    clock = time.perf_counter()
    cli = _lightning_cli(recipe, [*overrides, f"--trainer.default_root_dir={out / 'float'}"])
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    quantizing = _split_callbacks(trainer, recipe)
    if settings.float_weights is None:
        if getattr(module, "needs_float_training", True):  # False: the model starts trained (a distillation student)
            trainer.fit(module, datamodule=data)
        write_atomic(out / "float" / FLOAT_WEIGHTS, _serialized(module.state_dict()), make_parents=True)
    else:
        _load_float_weights(module, Path(settings.float_weights))
    tested = _test(trainer, module, data)
    metric, higher_is_better = quality_metric(module, tested)
    float_state = copy.deepcopy(module.state_dict())
    stages["float"] = {"metric": tested[metric], "seconds": time.perf_counter() - clock, "bytes": _state_bytes(module),
                       "weights": str(settings.float_weights or out / "float" / FLOAT_WEIGHTS)}

    # 2. PTQ: the same quantizers, calibrated on training batches, weights untouched
    console.rule("post-training quantization")
    clock = time.perf_counter()
    # not training.batches.first_batch, which leaves the RNG untouched: this peek draws a shuffling
    # sampler's seed, and the calibration batches below (so the published PTQ figures) follow that draw
    example = quantizing.example_inputs if quantizing.example_inputs is not None else model_inputs(next(iter(data.train_dataloader())))
    try:
        ptq = prepare(copy.deepcopy(module), quantizing.recipe, example)
    except ConfigError as error:  # a rule or skip pattern that matches no layer: named as in the recipe file
        raise quantizing.recipe_error(error) from None
    seen = calibrate(ptq, data.train_dataloader(), settings.calibration_batches, progress=console.is_terminal)
    stages["ptq"] = {"metric": _test(trainer, ptq, data)[metric], "seconds": time.perf_counter() - clock,
                     "calibration_batches": seen}
    del ptq

    # 3. QAT: the float weights fine-tuned with the recipe's callbacks; 4. export at its end
    console.rule("quantization-aware training")
    clock = time.perf_counter()
    qat_overrides = _qat_overrides(trainer, cli.config, settings)
    cli = _lightning_cli(recipe, [*overrides, *qat_overrides, f"--trainer.default_root_dir={out}"])
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    module.load_state_dict(float_state)
    genai = next((c for c in trainer.callbacks if isinstance(c, GenaiFolderExport)), None)
    exporting = next((c for c in trainer.callbacks if isinstance(c, ONNXExport)), None)
    if exporting is None and genai is None:
        exporting = ONNXExport(f"{recipe.stem}.onnx")
        trainer.callbacks.append(exporting)
    for callback in trainer.callbacks:
        if isinstance(callback, QuantizationAwareTraining):
            callback.print_summary = False  # the per-layer table, twice, would bury the results (qat.summary prints it)
    data.setup("test")
    test_batches = list(data.test_dataloader())
    if exporting is not None:
        exporting.verbose = False  # the results table below says what the per-layer report would
        exporting.verification_inputs = [model_inputs(batch) for batch in test_batches]
    if genai is not None:
        genai.example_ids = model_inputs(test_batches[0])["input_ids"][:GENERATION_PROMPTS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)  # the layers are listed in the results
        trainer.fit(module, datamodule=data)
    stages["qat"] = {"metric": _test(trainer, module, data)[metric], "seconds": time.perf_counter() - clock,
                     "overrides": qat_overrides}

    console.rule("ONNX Runtime: verification and latency")
    artifacts, verified_inputs = {}, 0
    if exporting is not None:
        example = exporting.example_inputs_for(trainer, module)
        verified_inputs = sum(tree_leaves(batch)[0].shape[0] for batch in exporting.verification_inputs)
        if not exporting.dynamic_batch:  # re-cut to the export's batch size, the remainder left out
            size = tree_leaves(example)[0].shape[0]
            verified_inputs = verified_inputs // size * size
        artifacts = {kind: _artifact_entry(artifact, example, settings) for kind, artifact in exporting.result.artifacts.items()}
    if genai is not None:
        artifacts["genai"] = _genai_entry(module, genai)
        verified_inputs = verified_inputs or len(genai.example_ids)
    results = {
        "version": RESULTS_VERSION,
        "recipe": str(recipe),
        "overrides": overrides,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "metric": {"name": metric, "higher_is_better": higher_is_better},
        "stages": stages,
        "artifacts": artifacts,
        "verified_inputs": verified_inputs,
        "seconds": time.perf_counter() - started,
    }
    write_results(out, results)
    console.print(results_table(results))
    for kind, entry in artifacts.items():
        console.print(f"ONNX {kind}: {entry['path']} + {entry['qparams']}", soft_wrap=True)
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}", soft_wrap=True)
    if not all(entry["verified"] for entry in artifacts.values()):
        raise QATError(f"an artifact failed verification: {[e['problems'] for e in artifacts.values() if not e['verified']]}")
    return results
