"""The machine a benchmark runs on, as the lines quoted in BENCHMARKS.md name it."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """The CPU model (``lscpu``'s "Model name"), else what ``platform`` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other jobs on a shared machine move timings)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
