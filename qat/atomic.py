"""One way to write a file so that a reader never sees half of it: a temporary name, then a rename."""

from __future__ import annotations

import os
from pathlib import Path

from qat.errors import QATError


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, make_parents: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through ``.<name>.<pid>.tmp``, fsync and ``os.replace``.

    A failed write leaves an earlier file as it was and no temporary behind; the process id in the
    temporary name lets several processes (DDP ranks filling the same cache entry) write at once,
    each rename whole. ``make_parents`` creates missing folders; otherwise a missing folder is an
    error naming it. Returns ``path``.

    Example::

        write_atomic("runs/r18/results.json", json.dumps(results))
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise QATError(f"cannot write `{path}`: the folder `{path.parent}` does not exist")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
