"""The ``qat`` command.

``qat check-recipe FILE`` validates a recipe YAML and prints it with every default filled in;
a bad recipe prints one line naming the file and key, and exits with status 2.
(Training, export and verification subcommands arrive with the Lightning CLI.)
"""

from __future__ import annotations

import argparse
import sys

import yaml

from qat.errors import QATError
from qat.recipe import QuantRecipe
from qat.version import __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qat`` console script."""
    parser = argparse.ArgumentParser(prog="qat", description="Quantization-aware training down to 4 bits.")
    parser.add_argument("--version", action="version", version=f"lightning-qat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-recipe", help="validate a recipe YAML and print it resolved")
    check.add_argument("recipe", help="path to a recipe YAML file")
    args = parser.parse_args(argv)
    try:
        recipe = QuantRecipe.from_yaml(args.recipe)
    except QATError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
