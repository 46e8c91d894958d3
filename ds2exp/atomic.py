"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the new one, never
part of one.

The data is written to a temporary file beside the target (`.<name>.<random><suffix>`, so one folder,
one file system), fsynced, renamed over the target, and the folder is fsynced so that the rename itself
survives a power loss. On any error the temporary file is removed and the target is left as it was.
Half-written temporary files of a killed process match `.*tmp*` (see training/recovery.py).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that wants a file name (MindSpore's
    checkpoint writer); when the block ends without error the file is renamed over `path`.
    `fsync=False` skips the flushes (a cache whose entries can be recomputed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", fsync: bool = True) -> Iterator[IO]:
    """`open()` for writing (`"w"` text as UTF-8, or `"wb"`), atomically replacing `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
