"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

import os
import platform


def cpu_description() -> str:
    """CPU model, torch's CPU capability (AVX2, AVX512, ...) and core count."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"
