"""Stock llama.cpp and a low-rank GGUF: a clear missing-tensor error at load, never wrong output (issue 5).

Needs the same llama.cpp built without the patches (``swiftsvd-export build-llamacpp --unpatched``,
a few minutes after the patched build thanks to ccache). Marked ``llamacpp_unpatched``: skipped where
that build does not exist, except in CI (``CI`` set, as ``.ci/run`` runs: ``tools/setup.sh --test``
builds it), where a missing build fails. ``LLAMA_CPP_LIB_PATH`` is read once per process, so stock llama.cpp runs in a
child process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from swiftsvd_export.backends.gguf import build
from swiftsvd_export.backends.gguf.writer import export_gguf
from swiftsvd_export.lowrank import save_lowrank

from .conftest import make_tiny_llama, make_tokenizer, skip_or_fail_in_ci
from .test_gguf import RANKS, _factorize

pytestmark = pytest.mark.llamacpp_unpatched

# load a GGUF in the stock library: {"loaded": bool, "log": llama.cpp's log}, plus 4 logits when it loads
CHILD = r"""
import json, sys
import llama_cpp
log = []
@llama_cpp.llama_log_callback
def cb(level, text, user_data):
    log.append(text.decode("utf-8", "replace"))
llama_cpp.llama_log_set(cb, None)
from llama_cpp import Llama
llama_cpp.llama_log_set(cb, None)
try:
    llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
except ValueError:
    print(json.dumps({"loaded": False, "log": "".join(log)}))
    sys.exit(0)
llm.eval([1, 5, 9])
print(json.dumps({"loaded": True, "log": "", "logits": [float(x) for x in llm.scores[2][:4]]}))
"""


@pytest.fixture(scope="module")
def stock():
    """The stock build's folder (skip, or fail in CI, when it is missing)."""
    d = build.lib_dir(unpatched=True)
    if not build.is_built(d):
        skip_or_fail_in_ci(f"stock llama.cpp not built ({d}): run `swiftsvd-export build-llamacpp --unpatched`")
    return d


def _load_in_stock(stock, path):
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(stock))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["log"] += proc.stderr  # whatever llama.cpp printed outside the log callback
    return r


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-stock")
    tok = make_tokenizer(root / "dense")
    model = make_tiny_llama(seed=3)
    model.save_pretrained(root / "dense", safe_serialization=True)
    save_lowrank(_factorize(model, RANKS), root / "lowrank", dtype="fp32", tokenizer=tok)
    return root / "lowrank", root / "dense"


def test_stock_llamacpp_refuses_a_lowrank_gguf(stock, folders, tmp_path):
    out = tmp_path / "lowrank.gguf"
    export_gguf(folders[0], out, factor_type="f16", quiet=True)
    r = _load_in_stock(stock, out)
    assert not r["loaded"], "stock llama.cpp loaded a low-rank GGUF"
    # layer 0's q_proj is factorized: its dense weight is the first tensor stock llama.cpp looks for
    assert "error loading model: check_tensor_dims: tensor 'blk.0.attn_q.weight' not found" in r["log"], \
        r["log"][-2000:]


def test_stock_llamacpp_runs_the_dense_export(stock, folders, tmp_path):
    """The same build loads the dense export: the refusal above is the low-rank file, not the build."""
    out = tmp_path / "dense.gguf"
    export_gguf(folders[1], out, factor_type="f16", quiet=True)
    r = _load_in_stock(stock, out)
    assert r["loaded"], r["log"][-2000:]
    assert len(r["logits"]) == 4
