"""Distributed calibration with 2 gloo processes on CPU, and the --device checks.

The ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment), but by hand, so that each rank can get its own arguments and cache folder.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftsvd_export.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "2", "--dtype", "fp32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argvs, caches, prelude: str = "", timeout: float = 120):
    """Start one process per argv as ranks of one gloo group; returns [(rc, stderr, seconds)]."""
    port = _free_port()
    procs = []
    for r, (argv, cache) in enumerate(zip(argvs, caches)):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(argvs)),
                   LOCAL_WORLD_SIZE=str(len(argvs)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(ROOT), SWIFTSVD_CACHE=str(cache), OMP_NUM_THREADS="1")
        code = (prelude if r == 1 else "") + "import sys\nfrom swiftsvd_export.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        procs.append((subprocess.Popen([sys.executable, "-c", code, "compress", *argv], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE), time.monotonic()))
    results = [None] * len(procs)
    try:
        for r, (p, t0) in enumerate(procs):  # rank 0 first: a stalled rank 1 is killed once rank 0 is done
            _, err = p.communicate(timeout=timeout)
            results[r] = (p.returncode, err, time.monotonic() - t0)
            if r == 0 and prelude:
                break
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("mode", [["--allocation", "dynamic"], ["--sequential", "--refit"]],
                         ids=["dynamic", "sequential-refit"])
def test_two_gloo_ranks_give_the_one_process_result(tiny_model_dir, calib_txt, tmp_path, monkeypatch, mode):
    args = [*BASE, "--calib", str(calib_txt), "--ratio", "0.4", *mode]
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path / "cache-1"))
    assert main(["compress", str(tiny_model_dir), str(tmp_path / "one"), *args]) == 0

    caches = [tmp_path / "cache-r0", tmp_path / "cache-r1"]
    res = _launch([[str(tiny_model_dir), str(tmp_path / "two"), *args],
                   [str(tiny_model_dir), str(tmp_path / "two-r1"), *args]], caches)
    assert [r[0] for r in res] == [0, 0], res
    assert "rank 1 of 2: calibrated 4 of 8 sequences" in res[1][1]
    assert not (tmp_path / "two-r1").exists()  # only rank 0 writes the output ...
    assert not (caches[1] / "stats").exists()  # ... and the statistics cache
    if "--sequential" not in mode:  # absolute sums: double counting or a lost shard would show here
        (entry_1,), (entry_2,) = ((c / "stats").glob("*/*/meta.json") for c in (tmp_path / "cache-1", caches[0]))
        for f in sorted(entry_1.parent.glob("block-*.safetensors")):
            s1, s2 = load_file(f), load_file(entry_2.parent / f.name)
            values = [k for k in s1 if k.endswith("::values")]
            assert values and all(torch.allclose(s1[k], s2[k], rtol=1e-9, atol=0) for k in values)

    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert two["calibration"]["token_sha256"] == one["calibration"]["token_sha256"]
    assert two["calibration"]["nsamples"] == 8
    assert two["ranks"] == one["ranks"]
    assert two["block_importance"] == pytest.approx(one["block_importance"], rel=1e-9, abs=1e-12)
    assert two["normalized_reconstruction_error"] == pytest.approx(one["normalized_reconstruction_error"], rel=1e-5)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and any(k.endswith(".A.weight") for k in a)
    for k in a:  # float32 round-off of the largest entry (bitwise equal on this machine)
        scale = a[k].abs().max().item()
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6 * scale), (k, (a[k] - b[k]).abs().max().item(), scale)


def test_mismatched_calibration_or_settings_are_refused(tiny_model_dir, calib_txt, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(calib_txt.read_text()[::-1])
    base = [str(tiny_model_dir), str(tmp_path / "o"), *BASE, "--ratio", "0.4"]
    caches = [tmp_path / "c0", tmp_path / "c1"]
    res = _launch([[*base, "--calib", str(calib_txt)], [*base, "--calib", str(other)]], caches)
    for rc, err, _ in res:
        assert rc == 2 and "rank 1's calibration set differs from rank 0's (token sha256" in _last_line(err), err
    res = _launch([[*base, "--calib", str(calib_txt)], [*base, "--calib", str(calib_txt), "--method", "whiten"]],
                  caches)
    for rc, err, _ in res:
        assert rc == 2 and "rank 1 was started with other settings than rank 0 (method 'whiten' vs 'swift')" \
            in _last_line(err), err
    assert not (tmp_path / "o").exists()


# Rank 1 runs the real command but dies (or hangs) in its second per-block all-reduce.
_FAULT = textwrap.dedent("""
    import os, time
    import swiftsvd_export.distributed as d
    _reduce, _calls = d.reduce_block, []
    def reduce_block(*a, **k):
        _calls.append(1)
        if len(_calls) == 2:
            {action}
        return _reduce(*a, **k)
    d.reduce_block = reduce_block
""")


@pytest.mark.parametrize("action", ["os._exit(3)", "time.sleep(600)"], ids=["dies", "hangs"])
def test_a_lost_rank_makes_rank_0_fail_within_the_timeout(tiny_model_dir, calib_txt, tmp_path, action):
    timeout = 4
    argv = [str(tiny_model_dir), str(tmp_path / "o"), *BASE, "--calib", str(calib_txt), "--ratio", "0.4",
            "--dist-timeout", str(timeout), "--no-cache"]
    res = _launch([argv, argv], [tmp_path / "c0", tmp_path / "c1"], prelude=_FAULT.format(action=action))
    rc, err, seconds = res[0]
    line = _last_line(err)
    assert rc == 2 and "rank 0 of 2: summing block 1's statistics failed after" in line, err
    assert f"the {timeout} s timeout (--dist-timeout" in line
    waited = float(line.split("failed after ")[1].split(" s")[0])
    assert waited <= timeout + 5  # a dead peer is noticed at once (closed socket), a hung one at the timeout
    if action.startswith("time"):
        assert waited >= timeout - 0.5
    assert not (tmp_path / "o").exists()


def test_bad_device_and_timeout_are_one_clear_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--device", "mps"]) == 2
    assert "--device mps: unsupported" in capsys.readouterr().err
    assert main(["compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--dist-timeout", "0"]) == 2
    assert "--dist-timeout must be a positive number of seconds" in capsys.readouterr().err
    assert not out.exists()


def test_one_gpu_for_every_rank_of_a_node_is_refused_before_nccl(monkeypatch):
    """NCCL answers two ranks on one GPU with "invalid usage" (seen on a 1-GPU H200, NCCL 2.28.9,
    tools/results/cuda-2026-11-30.json); the explicit cuda:N is refused with the fix instead."""
    from swiftsvd_export import distributed
    from swiftsvd_export.errors import SwiftSVDError

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SwiftSVDError, match=r"--device cuda:0 puts all 2 ranks of this node on GPU 0, and NCCL "
                                            r"needs one GPU per rank: use --device cuda \(each rank"):
        distributed.check_one_gpu_per_rank("cuda:0")
    distributed.check_one_gpu_per_rank("cuda")  # each rank its LOCAL_RANK's GPU
    distributed.check_one_gpu_per_rank("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    distributed.check_one_gpu_per_rank("cuda:0")  # one rank per node (multi-node) may name its GPU


def test_device_cuda_without_cuda_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-GPU message cannot occur")
    out = tmp_path / "o"
    assert main(["compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["swiftsvd-export compress: error: --device cuda: no CUDA GPU is available "
                   f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu"]
    assert not out.exists()

