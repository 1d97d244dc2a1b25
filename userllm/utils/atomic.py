"""Atomic writes: a reader sees the old file (or none) or the complete new one, never half of one.

Every file is written to a temporary name in the destination directory, flushed and fsync'ed, then
moved over the destination with :func:`os.replace` (atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest``, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def jsonable(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by None: JSON has no such numbers,
    and Python's ``json`` would write the bare, invalid tokens ``NaN`` / ``Infinity``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (non-finite floats become null; see :func:`jsonable`)."""
    write_text(dest, json.dumps(jsonable(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def save_safetensors(dest: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a dict of tensors with :func:`safetensors.torch.save_file`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it becomes ``dest`` (replacing any old one).

    Used for multi-file artifacts such as a processed-data cache entry: readers either find the whole
    directory or none.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
