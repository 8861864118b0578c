"""Where kdsearch keeps what it computes once and reuses: decoded data sets and trained teachers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """`$KDSEARCH_CACHE_DIR`, else `~/.cache/kdsearch`."""
    return Path(os.environ.get("KDSEARCH_CACHE_DIR", "~/.cache/kdsearch")).expanduser()


def digest(obj: Any) -> str:
    """A short stable hash of JSON-able data, used as a cache key."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
