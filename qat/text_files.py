"""Reading a text or JSON file a user named (a recipe, a sidecar, a results file) with one-line errors.

``Path.read_text`` raises ``IsADirectoryError`` for a folder and ``UnicodeDecodeError`` for bytes
that are not UTF-8, and neither names the file in a way a CLI can print as one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qat.errors import QATError


def read_text(path: str | os.PathLike[str], kind: str) -> str:
    """The UTF-8 text of ``path``; a folder, an unreadable file or bytes that are not UTF-8 raise a
    :class:`QATError` naming the file as a ``kind`` (``recipe file``, ``results file``).

    Example:
        >>> read_text("/", "recipe file")
        Traceback (most recent call last):
        ...
        qat.errors.QATError: `/` is a folder, not a recipe file
    """
    path = Path(path)
    if path.is_dir():
        raise QATError(f"`{path}` is a folder, not a {kind}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise QATError(f"cannot read {kind} `{path}`: {err.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise QATError(f"cannot read {kind} `{path}`: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                       "save it as UTF-8") from None


def read_json(path: str | os.PathLike[str], kind: str) -> Any:
    """The JSON value in ``path``, read as :func:`read_text` reads it; a missing file or text that is
    not JSON raises a :class:`QATError` naming the file as a ``kind``."""
    path = Path(path)
    if not path.exists():
        raise QATError(f"{kind} `{path}` does not exist")
    try:
        return json.loads(read_text(path, kind))
    except json.JSONDecodeError as error:
        raise QATError(f"{kind} `{path}` is not valid JSON: {error}") from None
