"""Distributed calibration on torch.distributed: every rank calibrates its own shard of the sequences.

Under ``torchrun --nproc-per-node N swiftsvd-export compress ...`` (WORLD_SIZE > 1) the ranks
form one process group (gloo for ``--device cpu``, NCCL for ``--device cuda``; the code is the
same). The covariance statistic is a sum over tokens, so it splits exactly across data shards:

1. every rank loads the model and builds the FULL calibration set, then :func:`check_same`
   compares the ranks' settings, calibration token hash and model weights and refuses a mismatch;
2. rank 0 runs the ordinary pipeline; each calibration pass it starts is announced
   (:func:`begin_pass`) and the other ranks run the same pass (:func:`follow`) on their own
   contiguous slice of the sequences (:func:`shard`), keeping only their shard's hidden states;
3. per block, :func:`reduce_block` sums the float64 Gram accumulators, the importance numerator
   (sum of cosines) and the token count over the ranks, so every rank holds the statistics of
   the whole set (sums of float64 partial sums: equal to one process up to float64 round-off);
4. rank 0 alone factorizes, reads and writes the statistics cache and writes the output. In
   sequential mode it sends each compressed block to the others (:func:`sync_block`), so every
   rank feeds its shard through the same compressed block;
5. when rank 0's compression is done (:func:`finish`) the others leave.

Every collective runs under the process-group timeout (``--dist-timeout`` or
``$SWIFTSVD_DIST_TIMEOUT``, default 600 s): a rank that dies or stalls makes the others fail with
one line instead of hanging. The timeout must exceed the longest step rank 0 takes alone between
two collectives (factorizing one block; with --sequential also choosing the ranks).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from .devices import resolve_device
from .errors import SwiftSVDError

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "SWIFTSVD_DIST_TIMEOUT"
# Settings allowed to differ between ranks: paths (what they hold is compared by hash) and
# console or timeout choices that do not change the result.
LOCAL_SETTINGS = ("model", "output", "calib", "ranks_file", "progress", "overwrite", "dist_timeout")

_timeout_s = DEFAULT_TIMEOUT_S


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def timeout_seconds(flag: float | None) -> float:
    """The collective timeout: ``--dist-timeout``, else ``$SWIFTSVD_DIST_TIMEOUT``, else 600 s."""
    value, source = (flag, "--dist-timeout") if flag is not None else (os.environ.get(TIMEOUT_ENV), TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise SwiftSVDError(f"{source} must be a positive number of seconds, got {value!r}")
    return seconds


def start(device: str, timeout: float | None) -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); True on ranks other than 0."""
    global _timeout_s
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        check_one_gpu_per_rank(device)
        dev = resolve_device(device)
        _timeout_s = timeout_seconds(timeout)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=_timeout_s))
        except Exception as e:  # rendezvous failures surface as RuntimeError/DistNetworkError/ValueError
            raise SwiftSVDError(f"cannot join the torch.distributed process group: {_first_line(e)}") from None
        atexit.register(_shutdown)
    return dist.get_rank() != 0


def check_one_gpu_per_rank(device: str) -> None:
    """NCCL refuses two ranks on one GPU ("invalid usage"), so ``--device cuda:N`` given to every
    rank of a node is refused up front; ``--device cuda`` gives each rank its LOCAL_RANK's GPU."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        return  # resolve_device names the problem
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dev.type == "cuda" and dev.index is not None and local > 1:
        raise SwiftSVDError(f"--device {device} puts all {local} ranks of this node on GPU {dev.index}, and NCCL "
                            "needs one GPU per rank: use --device cuda (each rank takes the GPU of its LOCAL_RANK)")


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_on_error(code: int) -> None:
    """After a one-line error under torchrun, leave at once: tearing down a gloo group whose peers
    already left can abort the process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:240]


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one clear line."""
    t0 = time.monotonic()
    try:
        yield
    except SwiftSVDError:
        raise
    except Exception as e:  # DistBackendError / RuntimeError: a peer closed its connection or the timeout passed
        raise SwiftSVDError(
            f"rank {rank()} of {world_size()}: {what} failed after {time.monotonic() - t0:.1f} s: another rank "
            f"died, failed or stalled longer than the {_timeout_s:g} s timeout (--dist-timeout / {TIMEOUT_ENV}) "
            f"[{_first_line(e)}]") from None


def model_digest(model: torch.nn.Module) -> str:
    """Cheap, exact identity of the weights: names, shapes, dtypes and the bytes of ~4k elements per tensor."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same(cfg, calib, model: torch.nn.Module) -> None:
    """Refuse to start unless every rank has the same settings, calibration set and model."""
    if not active():
        return
    mine = {"settings": {k: v for k, v in asdict(cfg).items() if k not in LOCAL_SETTINGS},
            "calibration": calib.hash, "model": model_digest(model)}
    ranks: list = [None] * world_size()
    with _collective("comparing the ranks' settings"):
        dist.all_gather_object(ranks, mine)
    ref = ranks[0]
    for r, other in enumerate(ranks[1:], 1):
        diff = [k for k in ref["settings"] if other["settings"].get(k) != ref["settings"][k]]
        if diff:
            raise SwiftSVDError(f"rank {r} was started with other settings than rank 0 ("
                                + ", ".join(f"{k} {other['settings'].get(k)!r} vs {ref['settings'][k]!r}" for k in diff)
                                + "); start every rank with the same command")
        if other["calibration"] != ref["calibration"]:
            raise SwiftSVDError(f"rank {r}'s calibration set differs from rank 0's (token sha256 "
                                f"{other['calibration'][:16]} vs {ref['calibration'][:16]}): every rank must read the "
                                "same calibration text with the same tokenizer, --nsamples, --seqlen and --seed")
        if other["model"] != ref["model"]:
            raise SwiftSVDError(f"rank {r}'s model weights differ from rank 0's (digest {other['model'][:16]} vs "
                                f"{ref['model'][:16]}): every rank must load the same checkpoint")
    if calib.ids.shape[0] < world_size():
        raise SwiftSVDError(f"--nsamples {calib.ids.shape[0]} is smaller than the {world_size()} ranks: "
                            "every rank needs at least one calibration sequence")


def shard(ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of the calibration sequences (all of them in one process)."""
    return torch.tensor_split(ids, world_size())[rank()] if active() else ids


def begin_pass(sequential: bool, cross: bool) -> None:
    """Rank 0: tell the other ranks which calibration pass follows."""
    if active() and rank() == 0:
        with _collective("starting a calibration pass"):
            dist.broadcast_object_list([{"sequential": sequential, "cross": cross}], src=0)


def finish() -> None:
    """Rank 0: calibration is over, the other ranks may leave (rank 0 goes on to write)."""
    if active() and rank() == 0:
        with _collective("telling the other ranks that calibration is over"):
            dist.broadcast_object_list([None], src=0)


def reduce_block(index: int, tensors: list[torch.Tensor], cos_sum: float, n_tokens: int) -> tuple[float, int]:
    """Sum a block's float64 accumulators (in place), cosine sum and token count over the ranks."""
    if not active():
        return cos_sum, n_tokens
    device = tensors[0].device if tensors else torch.device("cpu")
    scalars = torch.tensor([cos_sum, float(n_tokens)], dtype=torch.float64, device=device)
    with _collective(f"summing block {index}'s statistics"):
        for t in tensors:
            dist.all_reduce(t)
        dist.all_reduce(scalars)
    return scalars[0].item(), int(scalars[1].item())


def sync_block(layer: torch.nn.Module) -> None:
    """Sequential mode: give every rank rank 0's compressed block (structure, then every tensor)."""
    if not active():
        return
    from .lowrank import LowRankLinear, replace_module

    box: list = [None]
    if rank() == 0:
        box[0] = {n: (m.in_features, m.out_features, m.rank, m.B.bias is not None, m.A.weight.dtype)
                  for n, m in layer.named_modules() if isinstance(m, LowRankLinear)}
    with _collective("sending the compressed block"):
        dist.broadcast_object_list(box, src=0)
        if rank() != 0:
            device = next(layer.parameters()).device
            for name, (n_in, n_out, k, bias, dtype) in box[0].items():
                if not isinstance(layer.get_submodule(name), LowRankLinear):
                    replace_module(layer, name, LowRankLinear(n_in, n_out, k, bias, dtype=dtype, device=device))
        for _, t in sorted(layer.state_dict().items()):
            dist.broadcast(t, src=0)


def _keep(layer, stats) -> None:
    """Ranks other than 0 do not factorize; in sequential mode rank 0's block arrives by sync_block."""


def follow(cfg) -> None:
    """Ranks other than 0: calibrate this rank's shard in every pass rank 0 announces, then leave."""
    from .architectures import spec_for
    from .calibration import DEFAULT_CALIBRATION, build_calibration
    from .covariance import calibrate
    from .models import load_model

    model, tokenizer, _ = load_model(cfg.model)
    calib = build_calibration(tokenizer, cfg.calib or DEFAULT_CALIBRATION, cfg.nsamples, cfg.seqlen, cfg.seed,
                              cfg.text_field, cache=cfg.cache)
    check_same(cfg, calib, model)
    spec, device = spec_for(model.config), resolve_device(cfg.device)
    passes = 0
    while True:
        box: list = [None]
        with _collective("waiting for rank 0's next calibration pass"):
            dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        calibrate(model, spec, calib.ids, cfg.batch_size, on_block=_keep, sequential=box[0]["sequential"],
                  progress=False, cross=box[0]["cross"], device=device)
        passes += 1
    print(f"rank {rank()} of {world_size()}: calibrated {shard(calib.ids).shape[0]} of {calib.ids.shape[0]} "
          f"sequences in {passes} pass(es); rank 0 writes {cfg.output}", file=sys.stderr)
