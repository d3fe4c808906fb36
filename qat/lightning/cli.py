"""`QATLightningCLI`: Lightning's CLI for recipes, where a bad config is one line naming the file and key.

``qat fit|validate|test|predict`` and ``qat run`` read recipes (LightningCLI configs) with it. On
top of :class:`~lightning.pytorch.cli.LightningCLI` it:

- refuses a config file that is not UTF-8 text, naming it (jsonargparse would raise a bare
  ``UnicodeDecodeError``);
- refuses keys that jsonargparse drops without a word: a misspelled key whose value is an empty
  mapping (``recipez: {}``). jsonargparse merges a parsed config leaf by leaf, so an empty mapping
  under a key no class accepts leaves nothing behind for its unknown-key check to see;
- builds each :class:`~qat.lightning.QuantizationAwareTraining` callback once before anything
  else is instantiated (the model can take long to build), and puts the callback's place in the
  config and the config file in front of the key of a recipe error:
  ``r.yaml: `trainer.callbacks[0].init_args.recipe.weight.bits`: …``; and tells the callback that
  key and file, for the errors that come when its recipe meets the model (a skip pattern that
  matches no layer);
- raises a jsonargparse parse error (a value of the wrong type, an unknown option) as a
  :class:`~qat.errors.ConfigError` naming the file or command-line argument, the full key and what
  it expects, instead of exiting after the parser's usage (``exit_on_error=False``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import traceback
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from qat.errors import ConfigError, QATError
from qat.lightning.quantization_aware_training import QuantizationAwareTraining
from qat.preparation.recipe import _check_keys
from qat.text_files import read_text


def config_paths(argv: Sequence[str]) -> list[Path]:
    """The files given with ``--config`` / ``-c`` (a value that is no file is a YAML string, or
    missing: jsonargparse reports those)."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        if Path(value).exists():
            paths.append(Path(value))
    return paths


def _keys(namespace: Namespace) -> list[str]:
    return [key for key in namespace.keys(branches=True, nested=False) if not key.startswith("__")]


def _dropped_key(raw: Any, parsed: Any, path: str) -> None:
    """Raise ConfigError for the first key of ``raw`` (a config file's content) that holds an
    empty mapping and is missing from ``parsed`` (what jsonargparse made of it)."""
    if isinstance(raw, Mapping) and isinstance(parsed, Namespace):
        for key, value in raw.items():
            here = f"{path}.{key}" if path else str(key)
            if str(key) in parsed:
                _dropped_key(value, parsed[str(key)], here)
            elif "init_args" in parsed and isinstance(parsed["init_args"], Namespace) and str(key) in parsed["init_args"]:
                _dropped_key(value, parsed["init_args"][str(key)], here)  # init_args written flat, next to class_path
            elif isinstance(value, Mapping) and not value:
                _check_keys({key: value}, _keys(parsed), path)
    elif isinstance(raw, list) and isinstance(parsed, list):
        for i, (raw_item, parsed_item) in enumerate(zip(raw, parsed)):
            _dropped_key(raw_item, parsed_item, f"{path}[{i}]")


def _parameters(cls: type) -> list[str] | None:
    """The keyword arguments ``cls`` takes, or None when it takes any (``**kwargs``) or cannot say."""
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _unknown_init_args(raw: Any, path: str) -> None:
    """Raise ConfigError for the first ``init_args`` key of a ``class_path`` entry (anywhere in a config
    file's content) that the class's constructor does not take. jsonargparse refuses those too, but in
    a page that lists every type of the union it tried, without the file."""
    if isinstance(raw, Mapping):
        cls = _import(raw["class_path"]) if "class_path" in raw else None
        accepted = _parameters(cls) if isinstance(cls, type) else None
        if accepted is not None and isinstance(raw.get("init_args"), Mapping):
            _check_keys(raw["init_args"], accepted, f"{path}.init_args" if path else "init_args")
        for key, value in raw.items():
            _unknown_init_args(value, f"{path}.{key}" if path else str(key))
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            _unknown_init_args(item, f"{path}[{i}]")


def _import(class_path: Any) -> type | None:
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def qat_error_in(error: BaseException | None) -> QATError | None:
    """Our own error inside jsonargparse's wrapping (its cause or context), if the failure was one."""
    while error is not None:
        if isinstance(error, QATError):
            return error
        error = error.__cause__ or error.__context__
    return None


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS = re.compile(r"<class '(?:\w+\.)*(\w+)'>")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':(.*)")
_INNER = re.compile(r"Expected an? (.+?)\. Got value: (.*)")


def _readable(text: str) -> str:
    """``<class 'int'>`` as ``int``, ``NoneType`` as ``None``."""
    return _CLASS.sub(lambda m: "None" if m[1] == "NoneType" else m[1], text)


def _key_and_reason(message: str, options: Sequence[str]) -> tuple[str | None, str]:
    """The full key (``model.init_args.lr``) and what is wrong, from a jsonargparse error message: an
    unknown key with the closest of ``options``; else the keys of the nested ``Parser key`` lines,
    joined through ``init_args`` where a class_path's arguments were parsed, with the innermost
    expectation, a class that cannot be used, or the union's subtypes; else the message on one line."""
    unknown = re.match(r"unrecognized arguments: --?([^\s=]+)", message) or re.search(r"does not accept option '([^']+)'", message)
    if unknown:
        hint = difflib.get_close_matches(f"--{unknown[1]}", options, n=1)
        return unknown[1], "unknown key" + (f" (did you mean `{hint[0].lstrip('-')}`?)" if hint else "")
    parts: list[str] = []
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if (found := _PARSER_KEY.search(line)) is not None:
            parts.append(found[1])
        elif (cls := _CLASS_PATH.search(line)) is not None:
            problem = cls[2].strip() or (lines[i + 1].strip() if i + 1 < len(lines) else "")
            if problem.startswith("unrecognized arguments"):
                return ".".join(parts), problem
            if not _PARSER_KEY.search(problem):  # the class itself is the problem (it cannot be imported …)
                return ".".join([*parts, "class_path"]), f"`{cls[1]}`: {problem}"
            parts.append("init_args")
        elif (inner := _INNER.search(line)) is not None:
            return ".".join(parts) or None, f"expected {_readable(inner[1])}; got `{inner[2]}`"
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    given = re.search(r"Given value: (.*)", message)
    if parts and subtypes and given:
        expected = " or ".join(_readable(t.strip()) for t in subtypes[1].split(", "))
        return parts[0], f"expected {expected}; got `{given[1]}`"
    return (parts[0] if parts else None), " ".join(_readable(message).split())


def _given_on_command_line(key: str, argv: Sequence[str]) -> str | None:
    """The command-line argument that set ``key`` (or a key above it), as written."""
    for i, arg in enumerate(argv):
        option, _, value = arg.partition("=")
        if option.startswith("--") and (f"{key}.".startswith(f"{option[2:]}.") or option[2:].startswith(f"{key}.")):
            return arg if value or i + 1 == len(argv) else f"{arg} {argv[i + 1]}"
    return None


class QATLightningCLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` with the checks of this module."""

    def _section(self) -> Namespace:
        """The parsed config of the subcommand (``fit`` …), or the whole config without one."""
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, raising its errors (:meth:`parse_arguments` words them) rather than exiting."""
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, after a UTF-8, shape and class-argument check of the config files
        and before a check for the keys jsonargparse drops; a parse error is one ConfigError."""
        self._argv = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, Mapping | Namespace) else []
        files: dict[Path, Any] = {}  # each config file's content, read once for both checks
        for path in config_paths(self._argv):
            try:
                files[path] = raw = yaml.safe_load(read_text(path, "recipe file"))
            except yaml.YAMLError:  # jsonargparse reports where the syntax breaks
                continue
            if not isinstance(raw, Mapping | None):
                raise ConfigError("(top level)", f"a config must be a mapping (trainer, model, data …); the file holds a "
                                  f"{type(raw).__name__}", str(path))
            try:
                _unknown_init_args(raw, "")
            except ConfigError as error:
                raise ConfigError(error.key, error.reason, str(path)) from None
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            if qat_error_in(error) is not None:
                raise
            raise self._parse_error(parser, str(error), config_paths(self._argv)) from None
        for path, raw in files.items():
            try:
                _dropped_key(raw, self._section(), "")
            except ConfigError as error:
                raise ConfigError(error.key, error.reason, str(path)) from None

    def _parse_error(self, parser: LightningArgumentParser, message: str, files: list[Path]) -> QATError:
        """jsonargparse's ``message`` as one error: the command-line argument or the config files the
        value came from, the full key, and what the key expects."""
        subcommands = getattr(self, "_subcommand_parsers", {})
        subcommand = next((subcommands[a] for a in self._argv if a in subcommands), None)
        options = [*parser._option_string_actions, *(subcommand._option_string_actions if subcommand else ())]
        key, reason = _key_and_reason(message, options)
        argument = _given_on_command_line(key, self._argv) if key else None
        source = f"command line `{argument}`" if argument else ", ".join(map(str, files)) or None
        if key is None:  # a config file that is no YAML, or argparse's own message, which names the argument
            return QATError(f"{source}: {reason}" if source and not reason.startswith("argument ") else f"command line: {reason}")
        return ConfigError(key, reason, source)

    @override
    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; a QATError from the constructor of the model, the data or a
        callback gets that component's key and file (``r.yaml: `model.init_args.lr`: must be positive``)."""
        try:
            super().instantiate_classes()
        except Exception as error:
            cause = qat_error_in(error)
            if cause is None or (isinstance(cause, ConfigError) and cause.source):
                raise
            located = self._located(cause)
            if located is None:
                raise
            raise located from None

    def _located(self, error: QATError) -> ConfigError | None:
        """``error`` under the key of the component whose constructor raised it (found on the traceback),
        or None when none did."""
        built = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(error.__traceback__)
                 if frame.f_code.co_name == "__init__"]
        component = next((c for c in reversed(built) if isinstance(c, LightningModule | LightningDataModule | Callback)), None)
        if component is None:
            return None
        config = self._section()
        if isinstance(component, Callback):
            callbacks = config.get("trainer.callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            classes = [_import(entry.get("class_path")) if isinstance(entry, Namespace) else None for entry in callbacks]
            where = f"trainer.callbacks[{classes.index(type(component))}].init_args" if type(component) in classes else "trainer.callbacks"
        else:
            where = "model.init_args" if isinstance(component, LightningModule) else "data.init_args"
        if isinstance(error, ConfigError):
            key, reason = f"{where}.{error.key}", error.reason
        else:  # "lr must be positive; …": the message starts with the argument it is about
            first, _, rest = str(error).partition(" ")
            named = first in (_parameters(type(component)) or ()) and rest
            key, reason = (f"{where}.{first}", rest) if named else (where, str(error))
        argument = _given_on_command_line(key, self._argv)
        source = f"command line `{argument}`" if argument else ", ".join(map(str, config_paths(self._argv))) or None
        return ConfigError(key, reason, source)

    @override
    def before_instantiate_classes(self) -> None:
        """Build each QuantizationAwareTraining once: a bad recipe fails here, with its place in the config."""
        config = self._section()
        files = config.get("config") or []
        # the file is named when the callbacks can only have come from it
        overridden = any(arg.startswith("--trainer.callbacks") for arg in self._argv)
        source = str(files[0]) if len(files) == 1 and not overridden else None
        callbacks = config.get("trainer.callbacks")
        self._recipe_keys: list[str] = []
        for i, entry in enumerate(callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []):
            cls = _import(entry.get("class_path")) if isinstance(entry, Namespace) else None
            if not (isinstance(cls, type) and issubclass(cls, QuantizationAwareTraining)):
                continue
            init_args = entry.get("init_args") or Namespace()
            kwargs = {k: v.as_dict() if isinstance(v, Namespace) else v for k, v in init_args.items(branches=True, nested=False)
                      if not k.startswith("__")}
            try:
                cls(**kwargs)  # cheap (no model yet); the instance jsonargparse builds next is the one that runs
            except ConfigError as error:
                if error.source:  # the error is in a recipe file of its own, which it names
                    raise
                raise error.under(f"trainer.callbacks[{i}].init_args", source) from None
            self._recipe_keys.append(f"trainer.callbacks[{i}].init_args.recipe")
        self._recipe_source = source

    @override
    def after_instantiate_classes(self) -> None:
        """Tell each QuantizationAwareTraining where its recipe was written, for the errors of applying
        it to the model (a rule or skip pattern that matches no layer), which come at setup."""
        built = [c for c in self.trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
        for callback, key in zip(built, self._recipe_keys):
            callback.recipe_key, callback.recipe_source = key, self._recipe_source
