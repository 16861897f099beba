"""Files written whole: a kill part-way leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def jsonl_text(rows: Iterable[dict]) -> str:
    """Rows as JSON Lines (non-ASCII kept as is)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
