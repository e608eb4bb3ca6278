"""What the figures were measured on: CPU, cores, RAM, OS, Python and library versions."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "onnxruntime", "onnx", "llama-cpp-python", "gguf", "numpy",
             "optimum-onnx")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        import psutil

        return int(psutil.virtual_memory().total)


def describe() -> dict:
    """The report's ``machine`` object; libraries that are not installed are left out."""
    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "ram_bytes": ram_bytes(),
            "os": platform.platform(), "python": platform.python_version(), "libraries": libs}
