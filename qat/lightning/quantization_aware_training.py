"""`QuantizationAwareTraining`: quantization-aware training added to a Lightning loop by one callback.

::

    trainer = Trainer(callbacks=[QuantizationAwareTraining({"weight": {"bits": 4}})])
    trainer.fit(model)            # the LightningModule is unchanged

What it does, and when:

- ``setup`` (before the optimizer is built and before DDP wraps the model): swaps the
  LightningModule's layers for quantized twins (:func:`qat.prepare`). The twins share the float
  layers' Parameters, so the optimizer that ``configure_optimizers`` builds next holds exactly the
  parameters that train, learnable scales included. Conv+BatchNorm pairs are found by tracing
  one input: ``example_inputs`` given here, else the module's ``example_input_array``, else the
  first batch of the stage's dataloader (a tensor, the first element of a tuple/list, or a
  mapping passed as keyword arguments). Models without BatchNorm are never traced.
- every training batch: the :class:`~qat.QATSchedule` phase for the current step or epoch.
- validation / test / predict: observers off, so evaluation never moves the ranges.
- checkpoints: the quantizers' scales, zero points, observer ranges and switches are in the
  model's ``state_dict``; the recipe, the folded pairs and the schedule are stored under the
  checkpoint's ``"qat"`` key. The schedule position is Lightning's own step/epoch counter, so
  ``fit(ckpt_path=...)`` resumes in the same phase with the same numbers.
- logging: the phase, and every ``log_every_n_steps`` the per-layer range, scale, weight SQNR and
  fraction clipped (:func:`qat.layer_stats`) to the Trainer's loggers; a summary table at fit start and end.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from qat.analysis.stats import layer_stats
from qat.analysis.summary import summary
from qat.errors import ConfigError, QATError
from qat.preparation.prepare import STATE_NAME, QATState, is_prepared, needs_example_inputs, prepare
from qat.preparation.recipe import QuantRecipe
from qat.speed import allocator
from qat.training.batches import batch_inputs, first_batch
from qat.training.calibrate import record_calibration_clipping, warn_untrained_batchnorms
from qat.training.clipping import ClipTracker
from qat.training.control import evaluating, quantizers, set_weight_reuse
from qat.training.schedule import MAX_POSITION, Phase, QATSchedule
from qat.training.sharding import check_sharding, is_sharded, keep_ranks_in_step

CHECKPOINT_KEY = "qat"
"""Where the recipe, folded pairs and schedule live in a Lightning checkpoint."""


def _mapping_parser(cls: type[QuantRecipe] | type[QATSchedule]) -> Any:
    """A jsonargparse deserializer: ``cls`` from a mapping, validated as in Python."""
    def parse(value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"not a mapping: {value!r}")  # None and recipe paths go to the other types of the hint
        return cls.coerce(value)
    return parse


def _register_with_jsonargparse() -> None:
    """Make LightningCLI's parser (jsonargparse) hand recipes and schedules to this callback as written.

    Left alone, jsonargparse reads a recipe mapping as the QuantRecipe dataclass and builds the
    nested QuantSpec and LayerRule itself: their errors lose the key path (``bits`` for
    ``recipe.weight.bits``), and a misspelled key whose value is an empty mapping (``foo: {}``) is
    dropped without a word. A registered type is parsed by its function instead, here the same
    validation as in Python; when it refuses a mapping, the hint's ``Mapping[str, Any]`` takes it
    as is and ``__init__`` raises the error with its full key path.
    """
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # jsonargparse comes with LightningCLI; without it there is nothing to teach
        return
    register_type(QuantRecipe, serializer=QuantRecipe.to_dict, deserializer=_mapping_parser(QuantRecipe))
    register_type(QATSchedule, serializer=QATSchedule.to_dict, deserializer=_mapping_parser(QATSchedule))


_register_with_jsonargparse()


def stage_dataloaders(trainer: pl.Trainer, stage: str) -> Callable[[], Any]:
    """What makes the dataloader(s) the Trainer is about to run for ``stage``: pass it to
    :func:`~qat.training.batches.first_batch` for an example batch."""
    loop = {"fit": trainer.fit_loop, "validate": trainer.validate_loop, "test": trainer.test_loop,
            "predict": trainer.predict_loop}[stage]
    # Lightning has no public "dataloader of this stage before it runs"; every 2.x loop keeps it here.
    source = loop._data_source
    if not source.is_defined():
        raise QATError(f"no {stage} dataloader to take an example batch from; set `example_input_array` on the LightningModule "
                       "or pass example_inputs= to QuantizationAwareTraining")
    return source.dataloader


def check_strategy(strategy: Any) -> None:
    """Reject the strategies that shard parameters in a way the quantizers cannot follow.

    ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``) is supported: a
    layer's weight is whole inside its forward. ``FSDPStrategy`` wraps the model in FSDP1, which
    flattens every parameter of a unit, quantizer state included, into one sharded buffer, and
    DeepSpeed ZeRO-3 partitions parameters outside PyTorch's modules: neither is supported."""
    if isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
        raise QATError(f"QuantizationAwareTraining does not support {type(strategy).__name__}: it flattens or partitions "
                       "quantizer state with the weights. Shard with FSDP2 instead: ModelParallelStrategy(data_parallel_size=N, "
                       "tensor_parallel_size=1) and qat.training.sharding.fully_shard_prepared(<the module's model>, "
                       "mesh=self.device_mesh['data_parallel']) in configure_model(); or strategy='ddp', or DeepSpeed ZeRO stage 1/2")


def keep_quantizers_fp32(model: nn.Module) -> None:
    """Scales, zero points and ranges stay float32 when the Trainer casts the model
    (``precision="bf16-true"``): a bf16 scale would move the grid by up to 0.4 %."""
    for _, q in quantizers(model):
        if q.scale.dtype != torch.float32:
            q.float()


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs compiled: clipping is measured by hooks, which a compiled forward would recompile for."""
    return getattr(model, "_compiler_ctx", None) is not None or any(isinstance(m, torch._dynamo.OptimizedModule) for m in model.modules())


class QuantizationAwareTraining(Callback):
    """Quantization-aware training for any LightningModule, by adding one callback.

    Args:
        recipe: what to quantize and how: a :class:`~qat.QuantRecipe`, a mapping, a YAML path, or
            None for the default (int8 per-channel weights, uint8 per-tensor activations).
        schedule: when each phase starts (:class:`~qat.QATSchedule` or a mapping); default: QAT
            from the first step.
        example_inputs: inputs for the model's forward, used to find Conv+BatchNorm pairs
            (default: ``example_input_array``, else the first batch).
        log_every_n_steps: per-layer statistics every N optimizer steps (None: the Trainer's
            ``log_every_n_steps``; 0: off).
        print_summary: print the per-layer table at fit start and end (global rank zero).
        retain_freed_memory: opt-in; when training on the CPU, keep freed memory in the process
            for the next step (:func:`qat.speed.allocator.retain_freed_memory`, glibc only), so a
            QAT step's weight-sized temporaries do not take fresh pages from the system every
            step. It changes the process's allocator for the rest of its life, so it is off by
            default.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from qat.lightning import QuantizationAwareTraining
        >>> qat_callback = QuantizationAwareTraining(
        ...     {"weight": {"bits": 4}},
        ...     schedule={"unit": "epochs", "calibrate_from": 0, "fake_quant_from": 1, "freeze_bn_at": 3},
        ... )
        >>> trainer = Trainer(callbacks=[qat_callback], max_epochs=5, logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        recipe: QuantRecipe | Mapping[str, Any] | str | None = None,
        schedule: QATSchedule | Mapping[str, Any] | None = None,
        example_inputs: Any = None,
        log_every_n_steps: int | None = None,
        print_summary: bool = True,
        retain_freed_memory: bool = False,
    ) -> None:
        try:
            self.recipe = QuantRecipe.coerce(recipe)
        except ConfigError as error:  # a key of a recipe file is relative to that file, which the error names
            raise (error if error.source else error.under("recipe")) from None
        self.schedule = QATSchedule.coerce(schedule)
        self.example_inputs = example_inputs
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int)
                                              or not 0 <= log_every_n_steps <= MAX_POSITION):
            raise ConfigError("log_every_n_steps", f"must be an integer ≥ 0 and ≤ {MAX_POSITION} or null; got `{log_every_n_steps!r}`")
        for key, value in (("print_summary", print_summary), ("retain_freed_memory", retain_freed_memory)):
            if not isinstance(value, bool):
                raise ConfigError(key, f"must be true or false; got `{value!r}`")
        self.log_every_n_steps = log_every_n_steps
        # where the recipe was written, for recipe_error: its key and file (QATLightningCLI sets a
        # config's `trainer.callbacks[0].init_args.recipe` and the config file)
        self.recipe_key: str = "recipe"
        self.recipe_source: str | None = None
        self.print_summary = print_summary
        self.retain_freed_memory = retain_freed_memory
        self._model: weakref.ref[nn.Module] | None = None
        self._phase: Phase | None = None
        self._clips: ClipTracker | None = None
        self._phase_checks = self._after_calibration = False
        self._calibration_clips: ClipTracker | None = None
        self._logged_step = -1
        self._stats_pending = False
        self._sharded = False
        self._evaluation = ExitStack()

    # -- setup: prepare the model before the optimizer and DDP see it ------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        count = sum(isinstance(c, QuantizationAwareTraining) for c in trainer.callbacks)
        if count > 1:
            raise QATError(f"QuantizationAwareTraining was added to the Trainer {count} times; add it once "
                           "(one recipe describes every layer: use its rules for per-layer settings)")
        check_strategy(trainer.strategy)
        if self._model is not None and self._model() is pl_module:
            return  # fit() again, or validate/test/predict after fit(): already prepared by us
        if is_prepared(pl_module):
            self._adopt(pl_module)
        else:
            example = self._example_inputs(trainer, pl_module, stage) if needs_example_inputs(pl_module, self.recipe) else None
            try:
                prepare(pl_module, self.recipe, example)
            except QATError as error:
                hint = (" If the LightningModule builds its layers in setup() or configure_model(), build them in __init__: "
                        "the callback prepares the model before those hooks run.") if not list(pl_module.parameters()) else ""
                if isinstance(error, ConfigError):  # the recipe does not fit this model: a rule or skip pattern matches no layer
                    raise self.recipe_error(error, hint) from None
                raise QATError(f"{error}{hint}") from error
        self._model = weakref.ref(pl_module)

    def recipe_error(self, error: ConfigError, hint: str = "") -> ConfigError:
        """``error`` of the recipe (``skip[0]``: …) with the recipe's own key and file in front."""
        return ConfigError(f"{self.recipe_key}.{error.key}", f"{error.reason}{hint}", self.recipe_source)

    def _adopt(self, pl_module: nn.Module) -> None:
        """Accept a model prepared with this recipe (by an earlier callback or ``qat.prepare``); refuse any other."""
        state = getattr(pl_module, STATE_NAME, None)
        if not isinstance(state, QATState) or state.recipe.to_dict() != self.recipe.to_dict():
            theirs = state.recipe.to_dict() if isinstance(state, QATState) else "unknown (quantized layers without qat_state)"
            raise QATError(f"{type(pl_module).__name__} is already prepared with another recipe ({theirs}); "
                           "pass a float model to the Trainer, or give the callback the recipe the model was prepared with")

    def _example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array
        return batch_inputs(first_batch(stage_dataloaders(trainer, stage)))

    # -- training: the schedule, logging, summaries --------------------------------------------------

    def _position(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.schedule.unit == "steps" else trainer.current_epoch

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        # straight to the loggers (as LearningRateMonitor does): global, per-step values that need
        # no reduction across ranks or epochs
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def _apply_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        position = self._position(trainer)
        phase = self.schedule.phase_at(position)
        if phase != self._phase:
            self.schedule.apply(pl_module, position)
            rank_zero_info(f"QAT phase at {self.schedule.unit[:-1]} {position}: {phase.describe()}")
            self._log(trainer, {"qat/phase": float(phase.index)})
            # the checks of a calibration, on the phase's first training batch (qat.training.calibrate)
            self._phase_checks = True
            self._after_calibration = self._phase is not None and self._phase.observe and not self._phase.fake_quant_activations
            self._phase = phase

    def _check_calibration_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On the first training batch of a new phase: warn about BatchNorms that normalise with
        untrained statistics while observers are on, and measure, on the first batch that
        fake-quantizes activations after observing them in float, how much each input clips."""
        self._phase_checks = False
        if self._phase.observe and trainer.is_global_zero:
            warn_untrained_batchnorms(pl_module)
        if self._after_calibration and self._phase.fake_quant_activations and not _compiled(pl_module):
            self._calibration_clips = ClipTracker(pl_module).__enter__()

    def _print_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.print_summary and (trainer.is_global_zero or self._sharded):
            table = summary(pl_module)  # on every rank when sharded: it gathers the weights (qat.training.sharding)
            if trainer.is_global_zero:
                table.show()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keep_quantizers_fp32(pl_module)
        check_sharding(pl_module)
        self._sharded = is_sharded(pl_module)  # configure_model applied fully_shard (ModelParallelStrategy)
        if self._sharded:
            keep_ranks_in_step(pl_module)
        # micro-batches between two optimizer steps share their weights: fake-quantize them once (not under FSDP2,
        # which frees each gathered weight after its forward: a kept copy would hold what it frees)
        set_weight_reuse(pl_module, trainer.accumulate_grad_batches > 1 and not self._sharded)
        if self.retain_freed_memory and trainer.strategy.root_device.type == "cpu" and allocator.retain_freed_memory():
            rank_zero_info("QAT: glibc's malloc keeps freed CPU memory for the next step (retain_freed_memory=True)")
        self._phase = None
        self._apply_phase(trainer, pl_module)
        self._print_summary(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_weight_reuse(pl_module, False)  # frees the kept weights
        self._print_summary(trainer, pl_module)

    def _stats_interval(self, trainer: pl.Trainer) -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply_phase(trainer, pl_module)
        if self._phase_checks and pl_module.training:
            self._check_calibration_start(trainer, pl_module)
        interval, step = self._stats_interval(trainer), trainer.global_step
        if interval and step % interval == 0 and step != self._logged_step and trainer.loggers and (
                trainer.is_global_zero or self._sharded):  # when sharded, every rank: the statistics gather the weights
            self._logged_step = step
            if trainer.is_global_zero and not _compiled(pl_module):
                self._clips = ClipTracker(pl_module).__enter__()
            self._stats_pending = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._calibration_clips is not None:
            clips, self._calibration_clips = self._calibration_clips, None
            clips.__exit__(None, None, None)
            record_calibration_clipping(pl_module, clips, warn=trainer.is_global_zero)
        if not self._stats_pending:
            return
        self._stats_pending = False
        clips, self._clips = self._clips, None
        if clips is not None:
            clips.__exit__(None, None, None)
        stats = {f"qat/{name}": value for name, value in layer_stats(pl_module, clips).items()}
        stats["qat/phase"] = float(self._phase.index) if self._phase is not None else 0.0
        if trainer.is_global_zero:
            self._log(trainer, stats)

    # -- evaluation: observers off ---------------------------------------------------------------------

    def _start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keep_quantizers_fp32(pl_module)
        if trainer.state.fn != "fit":
            check_sharding(pl_module)  # (fit checked at its start)
            uncalibrated = [name for name, q in quantizers(pl_module) if q.fake_quant_enabled and not q.calibrated]
            if uncalibrated:
                raise QATError(f"quantizer `{uncalibrated[0]}` was never calibrated ({len(uncalibrated)} in all): pass the QAT "
                               f"checkpoint to {trainer.state.fn}(ckpt_path=...), or fit() first")
        self._evaluation.enter_context(evaluating(pl_module))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation.close()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation.close()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation.close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluation.close()  # an exception mid-evaluation must not leave the observers off
        if self._clips is not None:
            self._clips.__exit__(None, None, None)
            self._clips = None

    # -- checkpoints ------------------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            **getattr(pl_module, STATE_NAME).to_dict(),
            "schedule": self.schedule.to_dict(),
            "phase": self._phase.name if self._phase is not None else None,
        }

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        if saved.get("recipe") != self.recipe.to_dict():
            raise QATError(f"the checkpoint was trained with another recipe ({saved.get('recipe')}) than this callback's "
                           f"({self.recipe.to_dict()}); give the callback the checkpoint's recipe")
        if saved.get("schedule") != self.schedule.to_dict():
            rank_zero_info(f"QAT schedule changed since the checkpoint: {saved.get('schedule')} → {self.schedule.to_dict()}")
