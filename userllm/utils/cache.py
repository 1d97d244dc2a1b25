"""Verified cache entries: a directory whose ``manifest.json`` lists every file's size and SHA-256.

Every cache entry (processed data, default tokenizer, pretrained default LLM) is written inside
:func:`~userllm.utils.atomic.atomic_directory` and sealed with :func:`write_manifest`, which also
fsyncs the files so the rename publishes complete data. A reader calls :func:`read_manifest`: any
missing, truncated or altered file (or a missing/garbled manifest, e.g. an entry from before manifests)
raises :class:`CacheError`, and the caller rebuilds the entry instead of trusting it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class CacheError(ValueError):
    """A cache entry is unusable (the caller rebuilds it)."""


def json_digest(doc: Any, length: int = 64) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``doc`` as canonical JSON (sorted keys; values JSON
    cannot hold written by ``str``): the one way every cache key of the toolkit is made from its inputs."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:length]


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(directory: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Write ``directory/manifest.json`` = ``fields`` + ``files`` ({name: {size, sha256}} of every other
    file); fsync every file first. Returns the manifest."""
    directory = Path(directory)
    files = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {**fields, "files": files}
    with open(directory / MANIFEST, "w") as fh:
        fh.write(json.dumps(manifest, sort_keys=True, default=str))
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def read_manifest(directory: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The manifest of a sealed entry after checking every listed file (and each of ``required`` is
    listed); raises :class:`CacheError` naming the first problem."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"no readable {MANIFEST} ({type(exc).__name__})") from None
    for name in required:
        if name not in files:
            raise CacheError(f"{name} is not in the manifest")
    for name, info in files.items():
        f = directory / name
        if not f.is_file():
            raise CacheError(f"{name} is missing")
        if f.stat().st_size != info["size"]:
            raise CacheError(f"{name} has {f.stat().st_size} bytes, the manifest says {info['size']}")
        if sha256_file(f) != info["sha256"]:
            raise CacheError(f"{name} does not match its checksum")
    return manifest
