"""A corpus of bad recipes, callback arguments and command lines: each ends in one clear line.

Recipes are written as YAML files and given as dicts; command lines go through ``qat.app.cli.main``.
Every CLI case must print exactly one ``error: …`` line (naming the file, key or option at fault),
no traceback, and exit with status 2. Nothing here trains: configs fail before the first step.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import yaml
from tiny_models import TinyCNN

import qat
from qat import ConfigError, QATError, QATSchedule, QuantRecipe, QuantSpec
from qat.app.cli import main
from qat.app.compare import Limits
from qat.lightning import QuantizationAwareTraining

LATIN1 = "weight: {bits: 4}\n# Schätzung\n".encode("latin-1")
"""A recipe saved as Latin-1, not UTF-8: the ä is byte 0xe4 on line 2."""


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``qat …`` → (exit status, its only ``error:`` line); fails on a traceback or a second error line."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err[-2000:]
    return code, errors[0]


# -- recipes as dicts: bounds on every integer field -----------------------------------------------------------

GROUPED = {"granularity": "per_group"}
BAD_RECIPE_DICTS = [
    ({"weight": {**GROUPED, "group_size": 10**26}},
     "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `100000000000000000000000000`"),
    ({"weight": {**GROUPED, "group_size": 2**20 + 1}}, "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `1048577`"),
    ({"weight": {**GROUPED, "group_size": 1e26}}, "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `1e+26`"),
    ({"weight": {**GROUPED, "group_size": 32.0}}, "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `32.0`"),
    ({"weight": {**GROUPED, "group_size": True}}, "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `True`"),
    ({"weight": {**GROUPED, "group_size": 0}}, "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `0`"),
    ({"rules": [{"names": "fc", "weight": {**GROUPED, "group_size": -4}}]},
     "`rules[0].weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `-4`"),
    ({"weight": {"granularity": "per_channel", "axis": 10**9}}, "`weight.axis`: must be an integer from -8 to 7 or null; got `1000000000`"),
    ({"activation": {"averaging_constant": True}}, "`activation.averaging_constant`: must be a number in (0, 1]; got `True`"),
    ({"activation": {"observer": "percentile", "percentile": float("nan")}},
     "`activation.percentile`: must be a number in (50, 100]; got `nan`"),
    ({"skip": "fc["}, "`skip[0]`: `fc[` is not a valid regular expression: unterminated character set at position 2"),
]


@pytest.mark.parametrize(("data", "message"), BAD_RECIPE_DICTS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_RECIPE_DICTS)])
def test_recipe_dicts_out_of_bounds(data, message):
    with pytest.raises(ConfigError) as error:
        QuantRecipe.from_dict(data, source="r.yaml")
    assert str(error.value) == f"r.yaml: {message}"


def test_the_largest_group_size_is_allowed():
    assert QuantSpec(granularity="per_group", group_size=2**20).group_size == 2**20


BAD_SCHEDULES = [
    ({"fake_quant_from": 10**26},
     "`schedule.fake_quant_from`: `100000000000000000000000000` is not an integer ≥ 0 and ≤ 2147483647 (steps)"),
    ({"freeze_bn_at": 2**31}, "`schedule.freeze_bn_at`: `2147483648` is not an integer ≥ 0 and ≤ 2147483647 or null (steps)"),
    ({"calibrate_from": 1.0}, "`schedule.calibrate_from`: `1.0` is not an integer ≥ 0 and ≤ 2147483647 (steps)"),
]


@pytest.mark.parametrize(("data", "message"), BAD_SCHEDULES)
def test_schedule_positions_are_bounded(data, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        QATSchedule.coerce(data)


# -- callback arguments: the key path starts at the argument ------------------------------------------------------

BAD_CALLBACK_ARGS = [
    ({"recipe": {"weight": {"bits": 3.5}}},
     "`recipe.weight.bits`: must be one of 2, 3, 4, 5, 6, 7, 8, 16 (16 for activations only); got `3.5`"),
    ({"recipe": {"rules": [{"names": "fc", "weight": {"foo": 1}}]}},
     "`recipe.rules[0].weight.foo`: unknown key; allowed: " + ", ".join(QuantSpec.__dataclass_fields__)),
    ({"schedule": {"fake_quant_from": -1}}, "`schedule.fake_quant_from`: `-1` is not an integer ≥ 0 and ≤ 2147483647 (steps)"),
    ({"log_every_n_steps": 10**26},
     "`log_every_n_steps`: must be an integer ≥ 0 and ≤ 2147483647 or null; got `100000000000000000000000000`"),
    ({"print_summary": "yes"}, "`print_summary`: must be true or false; got `'yes'`"),
    ({"retain_freed_memory": None}, "`retain_freed_memory`: must be true or false; got `None`"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CALLBACK_ARGS,
                         ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD_CALLBACK_ARGS)])
def test_callback_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ConfigError) as error:
        QuantizationAwareTraining(**kwargs)
    assert str(error.value) == message


def test_a_callback_recipe_file_keeps_its_own_name_and_keys(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("weight: {bits: 16}\n")
    with pytest.raises(ConfigError) as error:
        QuantizationAwareTraining(str(path))
    assert str(error.value) == f"{path}: `weight.bits`: weights take 2–8 bits; got `16` (16 is for activations)"


# -- skip patterns must match, like rules ----------------------------------------------------------------------


def test_a_skip_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(QATError) as error:
        qat.prepare(TinyCNN(), {"skip": ["fc1", "head\\..*"]}, example_inputs=torch.randn(2, 3, 8, 8))
    assert str(error.value) == "`skip[1]`: 'head\\\\..*' matches no layer of TinyCNN; layer names look like: conv1, dw, fc2, fc1"


def test_a_rule_that_matches_nothing_through_the_callback_names_the_recipe_key(tmp_path, capsys, quiet_logging):
    path = fit_config(tmp_path, {"recipe": {"rules": [{"names": "fc1", "weight": {"bits": 8}}]}, "print_summary": False})
    assert run_cli(capsys, "fit", "--config", path) == (
        2, f"error: {path}: `{CALLBACK}.recipe.rules[0]`: names='fc1' matches no layer of LitClassifier; layer names look like: "
           "model.conv1, model.dw, model.fc1, model.fc2")


def test_a_skip_pattern_that_matches_is_fine():
    model = qat.prepare(TinyCNN(), {"skip": ["fc1"]}, example_inputs=torch.randn(2, 3, 8, 8))
    assert "skipped by recipe skip[0]" in qat.summary(model).float_layers["fc1"]


# -- qat check-recipe ----------------------------------------------------------------------------------------------

CHECK_RECIPE = [
    ("weight: {granularity: per_group, group_size: 100000000000000000000000000}\n",
     "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `100000000000000000000000000`"),
    ("weight: {granularity: per_group, group_size: 1e26}\n",
     "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `'1e26'`"),
    ("weight: {granularity: per_group, group_size: 1.0e+26}\n",
     "`weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `1e+26`"),
    ("rules:\n  - names: fc\n    weight: {bits: 4, foo: 1}\n",
     "`rules[0].weight.foo`: unknown key; allowed: " + ", ".join(QuantSpec.__dataclass_fields__)),
]


@pytest.mark.parametrize(("text", "message"), CHECK_RECIPE)
def test_check_recipe_names_the_file_and_key(text, message, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert run_cli(capsys, "check-recipe", path) == (2, f"error: {path}: {message}")


def test_check_recipe_refuses_a_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(LATIN1)
    assert run_cli(capsys, "check-recipe", path) == (
        2, f"error: cannot read recipe file `{path}`: not UTF-8 text (byte 0xe4 on line 2); save it as UTF-8")


def test_check_recipe_refuses_a_folder(tmp_path, capsys):
    assert run_cli(capsys, "check-recipe", tmp_path) == (2, f"error: `{tmp_path}` is a folder, not a recipe file")


# -- qat fit --config: LightningCLI configs ------------------------------------------------------------------------

CALLBACK = "trainer.callbacks[0].init_args"


def fit_config(tmp_path, init_args: dict, name: str = "r.yaml") -> str:
    """A LightningCLI config with the tiny classifier and a QuantizationAwareTraining callback."""
    config = {
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "qat.lightning.QuantizationAwareTraining", "init_args": init_args}]},
        "model": {"class_path": "lightning_models.LitClassifier"},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


SPEC_KEYS = ", ".join(QuantSpec.__dataclass_fields__)
CALLBACK_KEYS = "recipe, schedule, example_inputs, log_every_n_steps, print_summary, retain_freed_memory"
BAD_FIT_CONFIGS = [
    ({"recipe": {"weight": {"bits": 3.5}}},
     f"`{CALLBACK}.recipe.weight.bits`: must be one of 2, 3, 4, 5, 6, 7, 8, 16 (16 for activations only); got `3.5`"),
    ({"recipe": {"weight": {"bits": 16}}}, f"`{CALLBACK}.recipe.weight.bits`: weights take 2–8 bits; got `16` (16 is for activations)"),
    ({"recipe": {"rules": [{"names": "model\\.fc1", "weight": {"foo": 1}}]}},
     f"`{CALLBACK}.recipe.rules[0].weight.foo`: unknown key; allowed: {SPEC_KEYS}"),
    ({"recipe": {"weight": {"granularity": "per_group", "group_size": 1e26}}},
     f"`{CALLBACK}.recipe.weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `1e+26`"),
    ({"recipe": {"weight": {"granularity": "per_group", "group_size": 10**26}}},
     f"`{CALLBACK}.recipe.weight.group_size`: must be an integer from 1 to 1048576 (2^20); got `100000000000000000000000000`"),
    ({"recipez": {}, "recipe": {"weight": {"bits": 4}}},
     f"`{CALLBACK}.recipez`: unknown key (did you mean `recipe`?); allowed: {CALLBACK_KEYS}"),
    ({"recipe": {"weight": {"bits": 4, "foo": {}}}}, f"`{CALLBACK}.recipe.weight.foo`: unknown key; allowed: {SPEC_KEYS}"),
    ({"recipe": {"weight": {"bits": 4}, "skipp": {}}},
     f"`{CALLBACK}.recipe.skipp`: unknown key (did you mean `skip`?); allowed: weight, activation, rules, skip, fold_bn, "
     "residuals, operators, bias"),
    ({"schedule": {"fake_quant_from": 2, "warmup": {}}},
     f"`{CALLBACK}.schedule.warmup`: unknown key; allowed: unit, calibrate_from, fake_quant_from, activation_fake_quant_from, "
     "learn_scales_from, freeze_observers_at, freeze_bn_at"),
    ({"recipez": {"weight": {"bits": 4}}}, f"`{CALLBACK}.recipez`: unknown key (did you mean `recipe`?); allowed: {CALLBACK_KEYS}"),
    ({"recipez": None}, f"`{CALLBACK}.recipez`: unknown key (did you mean `recipe`?); allowed: {CALLBACK_KEYS}"),
    ({"log_every_n_steps": 10**26},
     f"`{CALLBACK}.log_every_n_steps`: must be an integer ≥ 0 and ≤ 2147483647 or null; got `100000000000000000000000000`"),
]


@pytest.fixture
def quiet_logging(monkeypatch):
    # Lightning's log handlers may still hold an earlier test's captured stream: keep logging's own
    # "--- Logging error ---" report about that out of the output under test
    monkeypatch.setattr(logging, "raiseExceptions", False)


@pytest.mark.parametrize(("init_args", "message"), BAD_FIT_CONFIGS, ids=[str(i) for i in range(len(BAD_FIT_CONFIGS))])
def test_fit_names_the_config_file_and_the_full_key(init_args, message, tmp_path, capsys, quiet_logging):
    path = fit_config(tmp_path, init_args)
    assert run_cli(capsys, "fit", "--config", path) == (2, f"error: {path}: {message}")


def test_fit_refuses_a_misspelled_model_argument_holding_an_empty_mapping(tmp_path, capsys, quiet_logging):
    path = tmp_path / "r.yaml"
    config = yaml.safe_load((tmp_path / fit_config(tmp_path, {})).read_text())
    config["model"]["init_args"] = {"lrr": {}}  # jsonargparse alone drops it and trains with the default lr
    path.write_text(yaml.safe_dump(config))
    assert run_cli(capsys, "fit", "--config", path) == (
        2, f"error: {path}: `model.init_args.lrr`: unknown key (did you mean `lr`?); allowed: lr, batch_size")


def test_fit_refuses_a_misspelled_model_argument_with_a_value(tmp_path, capsys, quiet_logging):
    path = tmp_path / "r.yaml"
    config = yaml.safe_load((tmp_path / fit_config(tmp_path, {})).read_text())
    config["model"]["init_args"] = {"lrr": 0.1}  # jsonargparse refuses it too, in a page listing the types it tried
    path.write_text(yaml.safe_dump(config))
    assert run_cli(capsys, "fit", "--config", path) == (
        2, f"error: {path}: `model.init_args.lrr`: unknown key (did you mean `lr`?); allowed: lr, batch_size")


def test_fit_refuses_a_config_that_is_a_list(tmp_path, capsys, quiet_logging):
    path = tmp_path / "r.yaml"
    path.write_text("- weight: {bits: 4}\n")
    assert run_cli(capsys, "fit", "--config", path) == (
        2, f"error: {path}: `(top level)`: a config must be a mapping (trainer, model, data …); the file holds a list")


def test_fit_refuses_a_config_that_is_not_utf8(tmp_path, capsys, quiet_logging):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# Schr\xe4g\n" + (tmp_path / fit_config(tmp_path, {})).read_bytes())
    assert run_cli(capsys, "fit", "--config", path) == (
        2, f"error: cannot read recipe file `{path}`: not UTF-8 text (byte 0xe4 on line 1); save it as UTF-8")


def test_fit_refuses_a_folder_as_config(tmp_path, capsys, quiet_logging):
    assert run_cli(capsys, "fit", "--config", tmp_path) == (2, f"error: `{tmp_path}` is a folder, not a recipe file")


def test_fit_with_a_callback_recipe_file(tmp_path, capsys, quiet_logging):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(LATIN1)
    assert run_cli(capsys, "fit", "--config", fit_config(tmp_path, {"recipe": str(latin1)})) == (
        2, f"error: cannot read recipe file `{latin1}`: not UTF-8 text (byte 0xe4 on line 2); save it as UTF-8")
    bad = tmp_path / "q.yaml"
    bad.write_text("weight: {bits: 16}\n")
    assert run_cli(capsys, "fit", "--config", fit_config(tmp_path, {"recipe": str(bad)})) == (
        2, f"error: {bad}: `weight.bits`: weights take 2–8 bits; got `16` (16 is for activations)")


def test_fit_with_a_skip_pattern_that_matches_nothing(tmp_path, capsys, quiet_logging):
    path = fit_config(tmp_path, {"recipe": {"skip": ["model\\.head"]}, "print_summary": False})
    assert run_cli(capsys, "fit", "--config", path) == (
        2, f"error: {path}: `{CALLBACK}.recipe.skip[0]`: 'model\\\\.head' matches no layer of LitClassifier; layer names look like: "
           "model.conv1, model.dw, model.fc1, model.fc2")


# -- qat run ---------------------------------------------------------------------------------------------------------


def test_run_on_a_folder(tmp_path, capsys):
    assert run_cli(capsys, "run", tmp_path) == (2, f"error: `{tmp_path}` is a folder, not a recipe file")


def test_run_on_a_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(LATIN1)
    assert run_cli(capsys, "run", path, "--out", tmp_path / "out") == (
        2, f"error: cannot read recipe file `{path}`: not UTF-8 text (byte 0xe4 on line 2); save it as UTF-8")
    assert not (tmp_path / "out").exists()


def test_run_names_the_config_file_and_the_full_key(tmp_path, capsys, quiet_logging):
    path = fit_config(tmp_path, {"recipe": {"rules": [{"names": "fc", "weight": {"bits": 1}}]}})
    assert run_cli(capsys, "run", path, "--out", tmp_path / "out") == (
        2, f"error: {path}: `{CALLBACK}.recipe.rules[0].weight.bits`: must be one of 2, 3, 4, 5, 6, 7, 8, 16 (16 for activations "
           "only); got `1`")


# -- qat compare -----------------------------------------------------------------------------------------------------


@pytest.fixture
def results(tmp_path) -> str:
    data = {"version": 1, "recipe": "r", "metric": {"name": "test_acc", "higher_is_better": True},
            "stages": {"float": {"metric": 0.9}, "ptq": {"metric": 0.8}, "qat": {"metric": 0.9}},
            "artifacts": {"ort": {"bytes": 100, "verified": True, "top1_agreement": 1.0, "latency_ms": 1.0, "perplexity": None}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(("option", "value"), [("--max-metric-drop", "nan"), ("--max-agreement-drop", "-1"),
                                               ("--max-size-increase", "inf"), ("--max-latency-increase", "-0.5")])
def test_compare_refuses_limits_that_are_not_finite_and_non_negative(option, value, results, capsys):
    assert run_cli(capsys, "compare", results, "--baseline", results, option, value) == (
        2, f"error: {option} must be a finite number ≥ 0; got `{float(value)}`")


def test_compare_names_a_results_file_that_is_not_utf8_or_a_folder(results, tmp_path, capsys):
    latin = tmp_path / "latin.json"
    latin.write_bytes(LATIN1)
    assert run_cli(capsys, "compare", latin, "--baseline", results) == (
        2, f"error: cannot read results file `{latin}`: not UTF-8 text (byte 0xe4 on line 2); save it as UTF-8")
    assert run_cli(capsys, "compare", results, "--baseline", tmp_path) == (2, f"error: `{tmp_path}` is a folder, not a results file")


def test_compare_limits_check_in_python():
    with pytest.raises(QATError, match=r"^--max-metric-drop must be a finite number ≥ 0; got `nan`$"):
        Limits(max_metric_drop=float("nan"))


# -- qat export: example inputs are checked against the model before the checkpoint is read ------------------------

EXPORT = ("export", "--model", "lightning_models:LitClassifier", "-o")


def export_cli(capsys, tmp_path, *options: str) -> tuple[int, str]:
    # the checkpoint does not exist: every case here must fail before it is read
    return run_cli(capsys, *EXPORT, tmp_path / "net.onnx", "--checkpoint", tmp_path / "none.ckpt", *options)


def test_export_input_shape_that_does_not_fit(tmp_path, capsys):
    assert export_cli(capsys, tmp_path, "--input-shape", "1,3,9,9") == (
        2, "error: --input-shape 1,3,9,9 does not fit LitClassifier: mat1 and mat2 shapes cannot be multiplied (1x648 and 512x32)")


@pytest.mark.parametrize(("shape", "message"), [
    ("0,3,8,8", "--input-shape `0,3,8,8` must be positive integers, e.g. 1,3,32,32"),
    ("1,-3,8,8", "--input-shape `1,-3,8,8` must be positive integers, e.g. 1,3,32,32"),
    ("1,3,8.5,8", "--input-shape `1,3,8.5,8` must be comma-separated integers, e.g. 1,3,32,32"),
    ("100000,100000,100000", "--input-shape `100000,100000,100000` has 1000000000000000 elements; an example input holds at most "
                             "268435456"),
])
def test_export_malformed_input_shape(shape, message, tmp_path, capsys):
    assert export_cli(capsys, tmp_path, "--input-shape", shape) == (2, f"error: {message}")


def test_export_float_inputs_to_a_model_of_token_ids(tmp_path, capsys):
    embedding = ("--model", "torch.nn:Embedding", "--init-args", '{"num_embeddings": 16, "embedding_dim": 4}')
    assert run_cli(capsys, "export", *embedding, "-o", tmp_path / "net.onnx", "--checkpoint", tmp_path / "none.ckpt",
                   "--input-shape", "1,8") == (
        2, "error: --input-shape 1,8 gives float tensors, but Embedding takes integer inputs (token ids?): save example inputs "
           "with torch.save and give --inputs")


def test_export_positional_inputs_to_a_model_of_keyword_inputs(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert run_cli(capsys, "export", "--model", "lightning_models:LitLlama", "-o", tmp_path / "net.onnx", "--checkpoint",
                   tmp_path / "none.ckpt", "--input-shape", "1,16") == (
        2, "error: --input-shape 1,16 does not fit LitLlama: LitLlama.forward() takes 1 positional argument but 2 were given")


def test_export_integer_inputs_to_a_float_model(tmp_path, capsys):
    inputs = tmp_path / "ids.pt"
    torch.save(torch.zeros(1, 3, 8, 8, dtype=torch.long), inputs)
    assert export_cli(capsys, tmp_path, "--inputs", inputs) == (
        2, f"error: --inputs `{inputs}` holds integer tensors (torch.int64), but LitClassifier takes float inputs: save float "
           "tensors, or give --input-shape for random float inputs")


def test_export_inputs_with_a_pickle_payload(tmp_path, capsys):
    import argparse

    inputs = tmp_path / "payload.pt"
    torch.save(argparse.Namespace(x=torch.zeros(1)), inputs)
    assert export_cli(capsys, tmp_path, "--inputs", inputs) == (
        2, f"error: --inputs `{inputs}` is not a plain tensor file: torch.load(weights_only=True) refused it (Unsupported global: "
           "GLOBAL argparse.Namespace was not an allowed global by default)")


@pytest.mark.parametrize(("content", "message"), [
    (b"hello", "is not a file written by torch.save ("),  # then torch's reason, which differs between its versions
    ("a string", "must hold a tensor, a tuple or list of tensors, or a dict of named tensors; it holds a str"),
    ({"x": 1}, "must hold a tensor, a tuple or list of tensors, or a dict of named tensors; it holds a dict with `x` of type int"),
])
def test_export_inputs_that_are_not_tensors(content, message, tmp_path, capsys):
    inputs = tmp_path / "inputs.pt"
    if isinstance(content, bytes):
        inputs.write_bytes(content)
    else:
        torch.save(content, inputs)
    code, line = export_cli(capsys, tmp_path, "--inputs", inputs)
    expected = f"error: --inputs `{inputs}` {message}"
    assert code == 2 and (line.startswith(expected) and line.endswith(")") if isinstance(content, bytes) else line == expected), line


def test_export_inputs_folder(tmp_path, capsys):
    assert export_cli(capsys, tmp_path, "--inputs", tmp_path) == (2, f"error: --inputs `{tmp_path}` is a folder, not a file")
