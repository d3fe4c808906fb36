"""One way to write files so that a reader never sees half of one: a temporary name, then a rename.

- :func:`write_atomic`: one file.
- :func:`new_folder`: a folder of files that belong together (an onnxruntime-genai model, a
  Hugging Face model), built under the temporary name and renamed into place when complete.
- :func:`write_temporary` + :func:`replace_all`: a set of files that belong together (an export's
  models and their sidecars): every temporary is written and fsync'd first, then all are renamed
  in the order given. A crash between two renames leaves some members new and some old; the
  caller orders the renames so that such a set is detectable (see :mod:`qat.export.exporter`),
  and :func:`remove_leftovers` lets the next writer clear the temporaries a killed one left.

Temporaries are named ``.<name>.<pid>.tmp`` beside the final file: hidden, on the same file
system (so the rename is atomic), and one per process, so that several processes (DDP ranks
filling the same cache entry) can write at once, each rename whole.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from qat.errors import QATError


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """``dir/name`` → ``dir/.name.<pid>.tmp``, where this process writes ``path`` before renaming it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s content to the disk (for a file written by someone else's ``save``)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_temporary(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to :func:`temporary_path` of ``path`` and fsync it; return the temporary.

    A failed write leaves no temporary behind. Nothing at ``path`` changes until the caller renames it."""
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _fsync_folder(folder: Path) -> None:
    """Make the renames into ``folder`` durable (a folder cannot be opened on Windows: nothing to do there)."""
    if os.name == "posix":
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def replace_all(renames: Sequence[tuple[Path, Path]]) -> None:
    """``os.replace(temporary, final)`` for each pair, in the order given, then fsync the folders.

    When a rename fails, the temporaries not yet renamed are removed and the error is raised: the
    members renamed before it stay new (the caller's order decides what a reader can tell from that)."""
    try:
        for temporary, final in renames:
            os.replace(temporary, final)
    except BaseException:
        for temporary, _ in renames:
            temporary.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(final.parent for _, final in renames):
        _fsync_folder(folder)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: this process is not writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: a process of another user has that id
        return True
    return True


def remove_leftovers(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Remove the temporaries that an interrupted write of ``paths`` left beside them; return those removed.

    A temporary is ``.<name>.tmp`` or ``.<name>.<pid>.tmp`` (:func:`temporary_path`); one whose
    process is still running on this machine is another writer's work in progress and is left alone."""
    removed = []
    for path in map(Path, paths):
        pattern = re.compile(rf"\.{re.escape(path.name)}(?:\.(\d+))?\.tmp")
        if not path.parent.is_dir():
            continue
        for candidate in sorted(path.parent.iterdir()):
            match = pattern.fullmatch(candidate.name)
            if match is None or (match.group(1) is not None and _alive(int(match.group(1)))) or not candidate.is_file():
                continue
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, make_parents: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through ``.<name>.<pid>.tmp``, fsync and ``os.replace``.

    A failed write leaves an earlier file as it was and no temporary behind. ``make_parents``
    creates missing folders; otherwise a missing folder is an error naming it. Returns ``path``.

    Example::

        write_atomic("runs/r18/results.json", json.dumps(results))
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise QATError(f"cannot write `{path}`: the folder `{path.parent}` does not exist")
    temporary = write_temporary(path, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def check_new_folder(folder: Path, writer: str) -> None:
    """QATError, naming ``writer``, when ``folder`` exists and is not an empty folder (nothing is overwritten)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise QATError(f"{writer}: `{folder}` exists and is not empty; give a new folder (nothing is overwritten)")


@contextmanager
def new_folder(folder: Path, writer: str) -> Iterator[Path]:
    """Build ``folder`` (new, or empty: :func:`check_new_folder`) in the folder this yields, its
    :func:`temporary_path`, renamed into place when the block ends; an error in the block removes
    it, so a failed writer leaves nothing behind.

    Example::

        with new_folder(Path("smollm2-int4"), "export_genai") as work:
            (work / "genai_config.json").write_text(config)
    """
    check_new_folder(folder, writer)
    work = temporary_path(folder)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
