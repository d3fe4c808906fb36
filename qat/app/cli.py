"""The ``qat`` command.

- ``qat fit|validate|test|predict --config recipes/….yaml [--key value …]``: Lightning's own CLI
  (:class:`~lightning.pytorch.cli.LightningCLI`); a recipe is a plain LightningCLI config (trainer
  with callbacks, ``model``, ``data`` by ``class_path``), and any key can be overridden on the
  command line (``--trainer.max_epochs 1``, ``--data.init_args.batch_size 32``).
- ``qat run RECIPE [--out DIR] [--key value …]``: the whole job of a recipe, float baseline →
  PTQ → QAT → export → verification, writing ``results.json`` and ``results.md``
  (:func:`qat.app.run.run_recipe`); options it does not know are LightningCLI overrides.
- ``qat compare results.json --baseline base.json``: side-by-side table; exit status 1 when the
  metric, ONNX Runtime parity or size regressed beyond the limits, or the latency with
  ``--max-latency-increase`` (:mod:`qat.app.compare`).
- ``qat check-recipe FILE``: validate a recipe YAML and print it with every default filled in.
- ``qat export --model pkg.module:Class --checkpoint last.ckpt --input-shape 1,3,32,32 -o net.onnx``:
  rebuild the QAT model from a Lightning checkpoint and write the verified ONNX artifacts and
  their calibration metadata (:func:`qat.export_onnx`). ``--inputs file.pt`` gives named or
  positional example inputs instead (a dict of tensors for a language model:
  ``{"input_ids": …, "attention_mask": …}``).
- ``qat recipes``: the shipped recipes, one line each (the first comment line of each file), as
  paths ``qat run`` takes from the working directory (:func:`recipe_folders` says where they are found).
- ``qat verify net.onnx [net.ort.onnx …] [--model pkg.module:Class --checkpoint last.ckpt]``: re-check
  model + metadata pairs (:func:`qat.export.verify.verify_artifact`), and with a checkpoint compare
  ONNX Runtime with the PyTorch model; exit status 1 when a pair is inconsistent.

Bad input prints one line naming the file, key or layer at fault and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from qat.app.quiet import args_on_purpose, silence_notices
from qat.errors import QATError
from qat.preparation.recipe import QuantRecipe
from qat.version import __version__


def _check_recipe(args: argparse.Namespace) -> int:
    recipe = QuantRecipe.from_yaml(args.recipe)
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
    return 0


def recipe_folders() -> list[Path]:
    """Where ``qat recipes`` looks, in order: the ``recipes/`` folder of the source tree this package
    runs from (a clone, or an editable install of one), then of the checkout pip installed it from
    (``pip install /path/to/clone`` records it). A wheel carries no recipes."""
    folders = [Path(__file__).resolve().parents[2] / "recipes"]
    try:
        url = json.loads(importlib.metadata.distribution("lightning-qat").read_text("direct_url.json") or "{}").get("url", "")
    except (importlib.metadata.PackageNotFoundError, json.JSONDecodeError):
        url = ""
    if url.startswith("file://"):
        folders.append(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)) / "recipes")
    return folders


def _shown(path: Path) -> str:
    """``path`` as ``qat run`` takes it from here: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _recipes(args: argparse.Namespace) -> int:
    folders = recipe_folders()
    found = next((folder for folder in folders if folder.is_dir()), None)
    if found is None:
        raise QATError(f"no recipes folder at {' or '.join(f'`{f}`' for f in folders)}: the recipes ship with the source "
                       "checkout (git clone), not the wheel; give `qat run` the path of a recipe YAML")
    for path in sorted(found.rglob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        print(f"{_shown(path)}  {first.lstrip('# ').strip()}")
    return 0


def _build_model(target: str, init_args: str | None) -> Any:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise QATError(f"--model `{target}` must look like `package.module:ClassOrFactory`")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise QATError(f"--model `{target}`: {error}") from None
    try:
        kwargs = json.loads(init_args) if init_args else {}
    except json.JSONDecodeError as error:
        raise QATError(f"--init-args is not JSON: {error}") from None
    return factory(**kwargs)


MAX_EXAMPLE_ELEMENTS = 2**28
"""The most elements of one ``--input-shape`` (1 GiB of float32): a typo there must not fill the memory."""


def _read_inputs(path: str) -> Any:
    """The tensors of ``--inputs``, loaded with ``weights_only=True``: a tensor, a tuple (a list
    is taken as one) or a dict of named tensors."""
    import torch

    from qat.lightning.checkpoint import read_torch_file

    inputs = read_torch_file(path, "--inputs")
    inputs = tuple(inputs) if isinstance(inputs, list) else inputs
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, tuple | dict) and inputs:
        pairs = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
        wrong = next(((key, value) for key, value in pairs if not isinstance(value, torch.Tensor)), None)
        if wrong is None:
            return inputs
        held = f"a {type(inputs).__name__} with `{wrong[0]}` of type {type(wrong[1]).__name__}"
    else:
        held = f"an empty {type(inputs).__name__}" if isinstance(inputs, tuple | dict) else f"a {type(inputs).__name__}"
    raise QATError(f"--inputs `{path}` must hold a tensor, a tuple or list of tensors, or a dict of named tensors; it holds {held}")


def _example_inputs(args: argparse.Namespace) -> Any:
    import math

    import torch

    if args.inputs:
        return _read_inputs(args.inputs)
    if not args.input_shape:
        raise QATError("give the example input: --input-shape 1,3,32,32 (repeatable) or --inputs file.pt")
    generator = torch.Generator().manual_seed(0)
    shapes = []
    for text in args.input_shape:
        try:
            shapes.append([int(d) for d in text.split(",")])
        except ValueError:
            raise QATError(f"--input-shape `{text}` must be comma-separated integers, e.g. 1,3,32,32") from None
        if min(shapes[-1]) < 1:
            raise QATError(f"--input-shape `{text}` must be positive integers, e.g. 1,3,32,32")
        if math.prod(shapes[-1]) > MAX_EXAMPLE_ELEMENTS:
            raise QATError(f"--input-shape `{text}` has {math.prod(shapes[-1])} elements; an example input holds at most "
                           f"{MAX_EXAMPLE_ELEMENTS}")
    tensors = [torch.randn(shape, generator=generator) for shape in shapes]
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def _check_example(model: Any, example: Any, args: argparse.Namespace) -> None:
    """One forward of the float model on the example inputs, before the checkpoint is read and the
    model traced: inputs it does not take are one line naming the option, not a trace from the export."""
    import torch
    from torch.utils._pytree import tree_leaves, tree_map

    from qat.training.batches import call_model

    def failure(inputs: Any) -> str | None:
        try:
            with torch.no_grad():
                call_model(model, inputs)
        except Exception as error:  # whatever the model's own code raises on inputs it does not take
            return (str(error).strip() or type(error).__name__).splitlines()[0]
        return None

    def retyped(dtype: torch.dtype) -> Any:
        return tree_map(lambda t: torch.zeros_like(t, dtype=dtype) if isinstance(t, torch.Tensor) else t, example)

    training = model.training
    model.eval()
    try:
        problem = failure(example)
        if problem is None:
            return
        given = f"--inputs `{args.inputs}`" if args.inputs else " ".join(f"--input-shape {s}" for s in args.input_shape)
        name = type(model).__name__
        integers = [t.dtype for t in tree_leaves(example) if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        if integers and failure(retyped(torch.float32)) is None:
            raise QATError(f"{given} holds integer tensors ({integers[0]}), but {name} takes float inputs: save float tensors, "
                           "or give --input-shape for random float inputs")
        if not integers and failure(retyped(torch.long)) is None:
            raise QATError(f"{given} gives float tensors, but {name} takes integer inputs (token ids?): save example inputs "
                           "with torch.save and give --inputs")
        raise QATError(f"{given} does not fit {name}: {problem}")
    finally:
        model.train(training)


def _export_genai(args: argparse.Namespace) -> int:
    from qat.app.models import resolve_model
    from qat.export.genai import check_folder, export_genai
    from qat.lightning import load_checkpoint

    if not args.tokenizer:
        raise QATError("--genai needs --tokenizer: the model's tokenizer folder, tokenizer.json, GGUF file or packaged model name")
    check_folder(Path(args.output))  # before the model is built and the checkpoint read
    model = _build_model(args.model, args.init_args)
    load_checkpoint(model, args.checkpoint)
    print(export_genai(model, args.output, tokenizer=resolve_model(args.tokenizer), context_length=args.context_length, rtol=args.rtol))
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.genai:
        return _export_genai(args)
    from qat.export.exporter import check_write_target, export_onnx
    from qat.lightning import load_checkpoint

    if args.tokenizer or args.context_length:
        raise QATError("--tokenizer and --context-length are for --genai exports")
    check_write_target(args.output, args.artifacts)  # before the model is built and the checkpoint read
    model = _build_model(args.model, args.init_args)
    example = _example_inputs(args)
    _check_example(model, example, args)
    load_checkpoint(model, args.checkpoint, example_inputs=example if not isinstance(example, dict) else None)
    export_onnx(model, example, args.output, artifacts=args.artifacts, dynamic_batch=args.dynamic_batch, rtol=args.rtol,
                min_top1=args.min_top1, verbose=True)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from qat.app.generate import generate

    generate(args.folder, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.raw)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from qat.export.ort_kernels import float_fallback
    from qat.export.verify import verify_artifact

    model = _verify_model(args) if args.model or args.checkpoint else None
    failed = 0
    for path in args.models:
        report = verify_artifact(path, model)
        check = report.qparams["verification"]
        print(f"{path}: {len(report.qparams['tensors'])} quantized tensors, {len(report.kernels)} layers; at export "
              f"max |ORT − PyTorch| {check['max_abs_diff']:.3g} of {check['output_scale']:.3g}")
        if report.parity is not None:
            print(f"  against the checkpoint: max |ORT − PyTorch| {report.parity.max_abs_diff:.3g} of {report.parity.output_scale:.3g}")
        fallback = float_fallback(report.kernels)
        if fallback:
            print(f"  runs in float in ONNX Runtime: {', '.join(fallback)}")
        for problem in report.problems:
            print(f"  problem: {problem}")
        print("  ok" if report.ok else "  FAILED")
        failed += not report.ok
    return 1 if failed else 0


def _verify_model(args: argparse.Namespace) -> Any:
    """The QAT model of ``--model`` + ``--checkpoint``, prepared as ``qat export`` prepares it."""
    import torch

    from qat.export.sidecar import read_qparams, sidecar_path
    from qat.lightning import load_checkpoint

    if not (args.model and args.checkpoint):
        raise QATError("--model and --checkpoint go together: the model class to rebuild and the checkpoint to load into it")
    model = _build_model(args.model, args.init_args)
    inputs = read_qparams(sidecar_path(args.models[0]))["inputs"]
    generator = torch.Generator().manual_seed(0)
    example = [torch.randn([d if isinstance(d, int) else 1 for d in meta["shape"]], generator=generator) for meta in inputs]
    floats = all(meta["dtype"].startswith("float") for meta in inputs)  # as qat export: named (LLM) inputs need none
    load_checkpoint(model, args.checkpoint, example_inputs=(example[0] if len(example) == 1 else tuple(example)) if floats else None)
    return model


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from qat.app.run import RunSettings, run_recipe
    from qat.lightning.cli import qat_error_in

    settings = RunSettings(output_dir=args.out, qat_fraction=args.qat_fraction, qat_epochs=args.qat_epochs,
                           qat_lr_scale=args.qat_lr_scale, calibration_batches=args.calibration_batches,
                           latency_runs=args.latency_runs, float_weights=args.float_weights)
    try:
        run_recipe(args.recipe, settings, overrides)
    except Exception as error:  # our errors arrive wrapped by jsonargparse when a class of the recipe raised them
        cause = qat_error_in(error)
        if cause is None:
            raise
        raise cause from None
    return 0


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qat.app.compare import Limits, checks_table, compare
    from qat.app.results import load_results

    limits = Limits(args.max_metric_drop, args.max_agreement_drop, args.max_size_increase, args.max_latency_increase)
    checks = compare(load_results(args.results), load_results(args.baseline), limits)
    failed = [check.measure for check in checks if not check.ok]
    Console().print(checks_table(checks, f"{args.results} vs baseline {args.baseline}"))
    print(f"regressed: {', '.join(failed)}" if failed else "no regression")
    return 1 if failed else 0


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(argv: list[str] | None) -> int:
    """Run a LightningCLI subcommand; model and data are given by ``class_path`` in the config.

    ``argv`` None reads the command line. A bad value, whether jsonargparse or one of our classes
    rejects it (a recipe key, a model name, a data argument), is printed as one line naming the
    config file or command-line argument and the full key (:class:`qat.lightning.cli.QATLightningCLI`)."""
    from qat.lightning.cli import QATLightningCLI, qat_error_in

    try:
        with args_on_purpose():
            QATLightningCLI(args=argv, subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})
    except Exception as error:
        cause = qat_error_in(error)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qat`` console script."""
    silence_notices()
    command_line = sys.argv[1:] if argv is None else argv
    if command_line and command_line[0] in LIGHTNING_COMMANDS:
        return lightning_cli(argv)
    parser = argparse.ArgumentParser(prog="qat", description="Quantization-aware training down to 4 bits.")
    parser.add_argument("--version", action="version", version=f"lightning-qat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     title=f"commands (and Lightning's {', '.join(LIGHTNING_COMMANDS)} --config RECIPE)")
    check = commands.add_parser("check-recipe", help="validate a recipe YAML and print it resolved")
    check.add_argument("recipe", help="path to a recipe YAML file")
    check.set_defaults(run=_check_recipe)

    export = commands.add_parser("export", help="QAT checkpoint → verified ONNX artifacts + calibration metadata")
    export.add_argument("--model", required=True, help="the float model to rebuild: package.module:ClassOrFactory")
    export.add_argument("--init-args", help="JSON keyword arguments for the model's constructor")
    export.add_argument("--checkpoint", required=True, help="Lightning checkpoint written with QuantizationAwareTraining")
    export.add_argument("--input-shape", action="append", help="example input size, e.g. 1,3,32,32 (repeat for more inputs)")
    export.add_argument("--inputs", help="example inputs saved with torch.save: a tensor, a tuple, or a dict of named tensors")
    export.add_argument("-o", "--output", required=True, help="the device artifact's .onnx path")
    export.add_argument("--artifacts", nargs="+", default=["device", "ort"], choices=["device", "ort"])
    export.add_argument("--dynamic-batch", action="store_true", help="leave the batch dimension free")
    export.add_argument("--rtol", type=float, default=0.05, help="allowed ORT vs PyTorch difference (share of the largest output)")
    export.add_argument("--min-top1", type=float, help="least ORT = PyTorch top-1 agreement for a classifier (default 1 − 2·rtol)")
    export.add_argument("--genai", action="store_true",
                        help="an onnxruntime-genai folder (-o names it) for a Llama, Mistral or Qwen2 language model, with a KV cache")
    export.add_argument("--tokenizer", help="--genai: the tokenizer folder, tokenizer.json, GGUF file or packaged model name")
    export.add_argument("--context-length", type=int, help="--genai: the longest sequence (default the model's)")
    export.set_defaults(run=_export)

    run = commands.add_parser("run", allow_abbrev=False, help="a recipe's whole job: float → PTQ → QAT → export → verify → results table",
                              description="Options not listed here are LightningCLI overrides of the recipe "
                                          "(--trainer.max_epochs=1, --data.init_args.batch_size=32), applied to every stage.")
    run.add_argument("recipe", help="a recipe YAML (a LightningCLI config with the QuantizationAwareTraining callback)")
    run.add_argument("--out", help="output folder (default runs/<recipe name>)")
    run.add_argument("--qat-fraction", type=float, default=0.5, help="QAT length as a share of the float run (default 0.5)")
    run.add_argument("--qat-epochs", type=int, help="QAT length in epochs instead")
    run.add_argument("--qat-lr-scale", type=float, default=0.1, help="QAT learning rate / the recipe's lr (default 0.1)")
    run.add_argument("--calibration-batches", type=int, default=32, help="training batches PTQ calibrates on (default 32)")
    run.add_argument("--float-weights", help="skip float training: an earlier run's float/float_weights.pt or a Lightning checkpoint")
    run.add_argument("--latency-runs", type=int, default=20, help="timed ONNX Runtime runs per artifact (default 20)")
    run.set_defaults(run=_run, overrides=True)

    compare = commands.add_parser("compare", help="gate a results.json against a baseline (exit 1 on regression)")
    compare.add_argument("results", help="results.json of the run to check")
    compare.add_argument("--baseline", required=True, help="results.json of the baseline run")
    compare.add_argument("--max-metric-drop", type=float, default=1.0, help="percent of the baseline metric (default 1)")
    compare.add_argument("--max-agreement-drop", type=float, default=0.5,
                         help="points of ORT = PyTorch top-1 agreement (default 0.5)")
    compare.add_argument("--max-size-increase", type=float, default=1.0, help="percent of the artifact's bytes (default 1)")
    compare.add_argument("--max-latency-increase", type=float, metavar="PCT",
                         help="gate ORT latency at PCT percent slower (default: reported, not gated; latency depends on "
                              "the machine, so gate it only against a baseline from the same one)")
    compare.set_defaults(run=_compare)

    recipes = commands.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(run=_recipes)

    verify = commands.add_parser("verify", help="re-check exported models against their .qparams.json (and a checkpoint)")
    verify.add_argument("models", nargs="+", help=".onnx files written by qat export")
    verify.add_argument("--model", help="also compare with the PyTorch model: package.module:ClassOrFactory (with --checkpoint)")
    verify.add_argument("--init-args", help="JSON keyword arguments for the model's constructor")
    verify.add_argument("--checkpoint", help="the Lightning checkpoint the files were exported from")
    verify.set_defaults(run=_verify)

    generate = commands.add_parser("generate", help="stream text from a folder written by qat export --genai (onnxruntime-genai)")
    generate.add_argument("folder", help="the exported folder")
    generate.add_argument("--prompt", required=True, help="the text to answer (through the chat template when there is one)")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="the most tokens to generate (default 128)")
    generate.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    generate.set_defaults(run=_generate)

    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args, unknown) if getattr(args, "overrides", False) else args.run(args)
    except QATError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (qat recipes | head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
