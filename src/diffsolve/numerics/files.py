"""The one way diffsolve writes a file, for every layer: atomically, with the permissions of a
normally created file, and through a temporary name that marks it as diffsolve's own.

A file is written to ``.<name>.diffsolve-<random>.tmp`` in the target's folder, flushed to
disk (``fsync``), given the mode the user's umask asks for, and renamed over the target
(``os.replace``): readers see the old file or the complete new one, never a torn one, and a
failure leaves no temporary file behind. Only files named this way, left by a killed process,
are ever removed by a later run (:func:`stale_temp_files`). Which existing files a command may
replace is the application's rule (:mod:`diffsolve.app.files`); the library's ``save``
methods write where they are told.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_MARK",
    "atomic_path",
    "atomic_temp",
    "copy_atomic",
    "file_mode",
    "stale_temp_files",
    "write_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: Part of every temporary file name: ``.<file>.diffsolve-<random>.tmp``.
TMP_MARK = ".diffsolve-"


def file_mode() -> int:
    """Permissions of a newly created file under the current umask (``mkstemp`` makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_temp(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path``, named ``.<name>.diffsolve-<random>.tmp``."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}", suffix=".tmp")


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files of diffsolve writers in ``folder`` (left by a killed process)."""
    return sorted(Path(folder).glob(f".*{TMP_MARK}*.tmp"))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The temporary file to write ``path``'s new contents into, by name (for writers that
    take a file name, e.g. safetensors' ``save_file``); on leaving the block it is flushed to
    disk, given the umask's permissions and renamed over ``path``. An exception removes it
    and leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = atomic_temp(path)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, write: Callable[[Any], None], binary: bool = True) -> Path:
    """``write(file)`` into a temporary file beside ``path`` (see :func:`atomic_path`), then
    renamed into place."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb" if binary else "w") as f:
        write(f)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """:func:`write_atomic` of bytes."""
    return write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` of text (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def copy_atomic(source: str | Path, path: str | Path) -> Path:
    """Copy the file ``source`` to ``path`` through :func:`write_atomic`."""
    with open(source, "rb") as src:
        return write_atomic(path, lambda f: shutil.copyfileobj(src, f))
