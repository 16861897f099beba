"""Crash-safe response store: every model answer (evaluation, instruction generation) is committed to
SQLite (WAL) as it arrives.

A response is keyed by a SHA-256 over the sample id, the prompt text, the content of every image,
the model fingerprint and the generation settings, so a rerun after a kill (at any point: WAL
commits are atomic) finds every answer already given and asks the model only for the rest; a
changed prompt, image, model or setting is a different key and is asked again. Failed requests are
not stored, so a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    sample_id TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def file_digest(path: str | os.PathLike, _cache: dict[str, str] | None = None) -> str:
    """xxh3-128 of a file's bytes (cached per path within a process when a cache dict is given)."""
    import xxhash

    key = str(path)
    if _cache is not None and key in _cache:
        return _cache[key]
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if _cache is not None:
        _cache[key] = digest
    return digest


def request_key(
    sample_id: str, prompt: str, image_digests: list[str], model_fp: str, settings: dict[str, Any]
) -> str:
    payload = json.dumps(
        {"id": str(sample_id), "prompt": prompt, "images": image_digests, "model": model_fp, "gen": settings},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseStore:
    """SQLite store of answered requests; safe to share between threads of one process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against process kills in WAL mode
        self._db.execute(_SCHEMA)

    def get_many(self, keys: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for key, resp in self._db.execute(
                    f"SELECT key, response FROM responses WHERE key IN ({marks})", chunk
                ):
                    out[key] = resp
        return out

    def get(self, key: str) -> str | None:
        return self.get_many([key]).get(key)

    def put(self, key: str, sample_id: str, response: str) -> None:
        """Commit one answer now (INSERT OR IGNORE: a duplicate key keeps the first answer)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO responses (key, sample_id, response, created) VALUES (?, ?, ?, ?)",
                (key, str(sample_id), response, time.time()),
            )

    def drop(self, keys: list[str]) -> None:
        """Forget the answers of ``keys`` (their next ``put`` stores anew)."""
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                self._db.execute(f"DELETE FROM responses WHERE key IN ({','.join('?' * len(chunk))})", chunk)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
