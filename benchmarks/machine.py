"""What every benchmark reports about the machine it ran on, and how it writes its figures."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return set(next(line for line in text.splitlines() if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_isa() -> str:
    """The widest vector extension the CPU lists: 'AVX-512', 'AVX2' or 'no AVX2'."""
    flags = cpu_flags()
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
