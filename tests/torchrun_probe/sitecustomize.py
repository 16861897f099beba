"""Imported at start-up by every rank the ``torchrun`` test fixture starts (it puts this folder on
PYTHONPATH): at exit, before the interpreter is torn down, it writes the names of the gloo threads
still running to ``$INTERLEAF_PROBE_DIR/rank<N>``.

A finished run must have freed its process group by then. A group something still holds keeps
gloo's threads alive into interpreter teardown, where a rank sometimes aborted
('terminate called without an active exception'): rarely, so CI saw it now and then. Listing the
threads makes that leak fail every time.
"""

import atexit
import os
from pathlib import Path


def _thread_name(task: Path) -> str:
    try:
        return (task / "comm").read_text().strip()
    except OSError:  # the thread ended since the folder was listed
        return ""


def _write_gloo_threads() -> None:
    tasks = Path("/proc/self/task")
    names = [_thread_name(t) for t in tasks.iterdir()] if tasks.is_dir() else []
    gloo = [n for n in names if "gloo" in n]
    Path(os.environ["INTERLEAF_PROBE_DIR"], f"rank{os.environ['RANK']}").write_text(" ".join(gloo))


if os.environ.get("INTERLEAF_PROBE_DIR") and os.environ.get("RANK") is not None:
    atexit.register(_write_gloo_threads)
