"""Files the application writes, and which existing files it may replace.

Every file is written by the one writer of :mod:`diffsolve.numerics.files` (a temporary
``.<name>.diffsolve-<random>.tmp`` beside the target, flushed to disk, the umask's
permissions, renamed into place). This module adds the application's rules
(:func:`check_output`): nothing is written inside the installed package, and an existing file
is replaced only where diffsolve can tell it made it — a run manifest that lists it
(``diffsolve sample``'s folders, :mod:`diffsolve.app.scale`), or the file's own diffsolve
marker (:func:`made_by_diffsolve`) — or with ``--force``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

from diffsolve.numerics.files import (
    TMP_MARK,
    atomic_path,
    atomic_temp,
    file_mode,
    stale_temp_files,
    write_atomic,
    write_bytes_atomic,
    write_text_atomic,
)

__all__ = [
    "PNG_SOFTWARE",
    "TMP_MARK",
    "atomic_path",
    "atomic_temp",
    "check_output",
    "file_mode",
    "file_sha256",
    "inside_package",
    "made_by_diffsolve",
    "package_dir",
    "remove_stale_temps",
    "save_npz_atomic",
    "stale_temp_files",
    "write_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: The ``Software`` text chunk of every PNG diffsolve writes (how it recognises its own).
PNG_SOFTWARE = "diffsolve"
#: Files larger than this are not opened to look for a marker (JSON and PNG headers are small).
_MAX_PROBE = 64 << 20


def package_dir() -> Path:
    """The installed ``diffsolve`` package folder (its shipped files are never written)."""
    import diffsolve

    return Path(diffsolve.__file__).resolve().parent


def inside_package(path: str | Path) -> bool:
    """Whether ``path`` lies inside the installed package (symbolic links resolved)."""
    return Path(path).resolve().is_relative_to(package_dir())


def check_output(
    path: str | Path,
    option: str,
    *,
    force: bool = False,
    replace_own: bool = True,
    example: str | None = None,
) -> Path:
    """The output file ``path`` of ``option`` (e.g. ``--json``), checked before any work:
    never inside the installed package, never a folder, and an existing file only with
    ``force`` or, with ``replace_own``, when diffsolve made it (:func:`made_by_diffsolve`).
    Raises a one-line ``ValueError`` naming the option and the way out; once the file may be
    written, temporary files a killed writer of it left are removed
    (:func:`remove_stale_temps`)."""
    path = Path(path)
    name = example or path.name or "out"
    if inside_package(path):
        raise ValueError(
            f"{option} {path} is inside the installed diffsolve package (its shipped files "
            f"are never replaced); write elsewhere, e.g. {option} ./{name}"
        )
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name, e.g. {path / name}")
    exists = path.exists() or path.is_symlink()
    if exists and not force and not replace_own:
        raise ValueError(
            f"{option} {path} exists; pass --force to replace it, or another {option}"
        )
    if exists and not force and not made_by_diffsolve(path):
        raise ValueError(
            f"{option} {path} exists and diffsolve did not make it (no diffsolve marker in "
            f"it); it is left untouched: pass --force to replace it, or another {option}"
        )
    remove_stale_temps(path)
    return path


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files a killed diffsolve writer of ``path`` left beside it
    (``.<name>.diffsolve-<random>.tmp``; no other file) and return them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}{TMP_MARK}*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def made_by_diffsolve(path: str | Path) -> bool:
    """Whether the file carries diffsolve's own marker: a safetensors ``format`` metadata
    entry, a JSON ``format`` field, or a PNG ``Software`` text chunk starting with
    ``diffsolve``, or a sample shard's ``fingerprint`` array. Unreadable files are not."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(8)
            if head == b"\x89PNG\r\n\x1a\n":
                return _png_software(f).startswith(PNG_SOFTWARE)
            if head[:2] == b"PK":
                return _npz_marked(path)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if 2 <= size <= min(path.stat().st_size - 8, _MAX_PROBE):  # a safetensors header
                return _safetensors_format(f, size).startswith("diffsolve")
        if path.stat().st_size > _MAX_PROBE:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, struct.error, zipfile.BadZipFile):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("diffsolve")


def _png_software(f: object) -> str:
    """The ``Software`` text of a PNG (after its signature), ``""`` if none."""
    while True:
        header = f.read(8)  # type: ignore[attr-defined]
        if len(header) < 8:
            return ""
        length, kind = struct.unpack(">I4s", header)
        if kind in (b"IDAT", b"IEND") or length > _MAX_PROBE:
            return ""
        body = f.read(length)  # type: ignore[attr-defined]
        f.read(4)  # type: ignore[attr-defined]  # CRC
        if kind == b"tEXt" and b"\0" in body:
            key, text = body.split(b"\0", 1)
            if key == b"Software":
                return text.decode("latin-1")


def _safetensors_format(f: object, size: int) -> str:
    """The ``format`` metadata entry of a safetensors file (after its 8-byte length)."""
    header = json.loads(f.read(size))  # type: ignore[attr-defined]
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return str(meta.get("format", "")) if isinstance(meta, dict) else ""


def _npz_marked(path: Path) -> bool:
    """A sample shard: an ``.npz`` with the run's ``fingerprint`` among its arrays."""
    with zipfile.ZipFile(path) as archive:
        return {"fingerprint.npy", "samples.npy", "seeds.npy"} <= set(archive.namelist())


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
