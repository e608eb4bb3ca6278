"""Where the covariance pass and the eigendecompositions run: ``--device cpu`` or ``--device cuda``.

The model stays in host memory; the calibration pass moves one decoder block at a time to the
device (with the hidden states and the float64 Gram accumulators), and the per-linear
decompositions move W and G there and bring the results back, so GPU memory holds one block.
Under torchrun, ``cuda`` means the GPU of the process's LOCAL_RANK.
"""
from __future__ import annotations

import os

import torch

from .errors import SwiftSVDError


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch.device for ``--device``, or a one-line error when it is not usable here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SwiftSVDError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise SwiftSVDError(f"--device {name}: unsupported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise SwiftSVDError(f"--device {name}: no CUDA GPU is available (torch {torch.__version__}, "
                            "torch.cuda.is_available() is False); use --device cpu")
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index >= torch.cuda.device_count():
        raise SwiftSVDError(f"--device {name}: GPU {device.index} does not exist "
                            f"({torch.cuda.device_count()} visible)")
    return device


def to_device(obj, device: torch.device | str):
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
