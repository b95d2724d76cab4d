"""Files the application writes: atomically, with normal permissions, and with temporary
names that identify them as diffsolve's own (the only temporary files a run ever removes)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TMP_MARK",
    "atomic_temp",
    "file_mode",
    "file_sha256",
    "save_npz_atomic",
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
    """Temporary files of diffsolve writers in ``folder`` (left by a killed run)."""
    return sorted(folder.glob(f".*{TMP_MARK}*.tmp"))


def write_atomic(path: str | Path, write: Callable[[Any], None], binary: bool = True) -> Path:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed
    into place with the permissions of a normally created file: readers see the old file or
    the complete new one, and a failure (a full disk) leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = atomic_temp(path)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """:func:`write_atomic` of bytes."""
    return write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` of text."""
    return write_atomic(path, lambda f: f.write(text), binary=False)


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write an uncompressed ``.npz`` atomically."""
    return write_atomic(path, lambda f: np.savez(f, **arrays))


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (cached per path, size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]
