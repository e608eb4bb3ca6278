"""Process memory figures for benchmarks and validation."""
from __future__ import annotations

import ctypes
import resource
from pathlib import Path


def rss_bytes(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process (this one by default) in bytes (0, 0 where /proc is absent)."""
    now = peak = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return now, peak


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB. VmHWM belongs to the exec'd image; ru_maxrss (the
    fallback off Linux) would carry the parent's high-water mark across fork+exec."""
    peak = rss_bytes()[1]
    return peak / 2**20 if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``). Block-by-block work frees
    large temporaries of many sizes; without this glibc keeps them and RSS creeps up by
    hundreds of MB on a 135M model. A no-op where glibc is absent."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
