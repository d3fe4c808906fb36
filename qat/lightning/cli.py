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
  matches no layer).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from qat.errors import ConfigError
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


class QATLightningCLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` with the checks of this module."""

    def _section(self) -> Namespace:
        """The parsed config of the subcommand (``fit`` …), or the whole config without one."""
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, after a UTF-8, shape and class-argument check of the config files
        and before a check for the keys jsonargparse drops."""
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
        super().parse_arguments(parser, args)
        for path, raw in files.items():
            try:
                _dropped_key(raw, self._section(), "")
            except ConfigError as error:
                raise ConfigError(error.key, error.reason, str(path)) from None

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

    def after_instantiate_classes(self) -> None:
        """Tell each QuantizationAwareTraining where its recipe was written, for the errors of applying
        it to the model (a rule or skip pattern that matches no layer), which come at setup."""
        built = [c for c in self.trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
        for callback, key in zip(built, self._recipe_keys):
            callback.recipe_key, callback.recipe_source = key, self._recipe_source
