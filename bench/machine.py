"""What machine a benchmark ran on: recorded beside every result (these machines are noisy)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra) -> dict:
    """CPU count and model, Python version, current 1-minute load average, plus `extra` fields."""
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
            "load_average_1min": os.getloadavg()[0]} | extra
