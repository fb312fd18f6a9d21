"""Keys for the on-disk caches derived from a dataset (statistics, decoded frames).

A cache entry is valid only for the exact dataset files it was computed from: its key holds the
dataset's ``meta/info.json`` hash and the size + mtime of each file read, and the entry's file
name is a hash of the whole key, so any change makes a new entry instead of a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    """``$VLA_RECIPES_CACHE``, else ``~/.cache/vla_recipes``: the parent of every derived-data cache."""
    return Path(os.environ.get("VLA_RECIPES_CACHE") or "~/.cache/vla_recipes").expanduser()


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def info_sha256(root: str | Path) -> str:
    """Hash of ``meta/info.json``: features, fps, file layout and codebase version of the dataset."""
    return sha256((Path(root) / "meta" / "info.json").read_bytes())


def file_identity(path: str | Path) -> list[int]:
    """Size and mtime (ns) of a file: an edit in place, even of the same size, changes it."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


def entry_stem(key: dict) -> str:
    """File name stem of a cache entry: a short hash of its JSON key."""
    return sha256(json.dumps(key, sort_keys=True))[:32]
