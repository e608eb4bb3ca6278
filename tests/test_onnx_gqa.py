"""ONNX ``--attention gqa``: each layer's attention as onnxruntime's GroupQueryAttention, its cache
appended in place by the project's runtime (one preallocated buffer bound as past and present).

A tiny random GQA Llama with every linear factorized, exported with plain and with GQA attention:
the same logits as torch (prefill, one-token steps past the buffer's first capacity, a left-padded
batch), the same greedy tokens, the MatMul pairs intact, optimum's loader still works, and the
combinations that cannot be written are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from swiftsvd_export.backends.onnx.export import export_onnx
from swiftsvd_export.backends.onnx.parity import parity
from swiftsvd_export.backends.onnx.runtime import OrtDecoder, SharedCache
from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export.latent_kv import LatentLlama
from swiftsvd_export.models import load_model

from .test_onnx import LAYERS, PROMPTS, prompt_ids, tiny_lowrank_folder
from .test_onnx_stack import FACTORS, RANKS


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_lowrank_folder(tmp_path_factory.mktemp("gqa") / "lowrank", RANKS, seed=2)


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder))[:2]


@pytest.fixture(scope="module")
def gqa(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gqa-onnx") / "gqa"
    export_onnx(folder, out, attention="gqa")
    return out


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_one_attention_node_per_layer_and_the_pairs_intact(folder, gqa, tmp_path):
    s = json.loads((gqa / "summary.json").read_text())
    assert s["attention"] == "gqa" and s["kv_cache"]["layout"] == "dense"
    assert s["graph_check"]["exported"]["ok"] and s["graph_check"]["ort_optimized"]["ok"]
    assert s["graph_check"]["exported"]["pairs_found"] == len(FACTORS)
    export_onnx(folder, tmp_path / "plain")
    ops, plain_ops = _ops(gqa / "model.onnx"), _ops(tmp_path / "plain" / "model.onnx")
    assert ops["GroupQueryAttention"] == LAYERS and "GroupQueryAttention" not in plain_ops
    graph = onnx.load(str(gqa / "model.onnx"), load_external_data=False).graph
    readers = {n.op_type for n in graph.node for i in n.input if i.startswith("past_key_values.")}
    assert readers == {"GroupQueryAttention"}  # no Concat copies the cache: the op appends
    assert sum(plain_ops.values()) - sum(ops.values()) >= 10 * LAYERS
    assert OrtDecoder(gqa).shared_buffers and not OrtDecoder(tmp_path / "plain").shared_buffers


def test_fp32_parity_and_greedy_with_torch(gqa, model):
    m, tok = model
    r = parity(m, gqa, prompt_ids(tok), gen_tokens=64)
    assert r["max_abs_logit"] <= 1e-3 and r["greedy_identical"] and r["passed"], r


def test_steps_in_place_past_the_first_capacity_equal_torch(gqa, model):
    """A 250-token prompt fills most of the first 256-position buffer; 12 one-token steps run past it
    (the buffer doubles, copying what it held) and every step matches torch's cache-less reference."""
    m, _ = model
    ref = LatentLlama(m, "dense").eval()
    dec = OrtDecoder(gqa)
    ids = np.random.default_rng(0).integers(0, 400, size=(1, 250))
    got, cache = dec.step(ids, None, 0)
    want, ref_cache = ref.step(torch.tensor(ids), None, 0)
    assert isinstance(cache, SharedCache) and cache.capacity == 256
    assert np.abs(got - want.numpy()).max() <= 1e-4
    for i in range(12):
        tok = np.asarray([[i + 7]])
        got, cache = dec.step(tok, cache, 250 + i)
        want, ref_cache = ref.step(torch.tensor(tok), ref_cache, 250 + i)
        assert np.abs(got - want.numpy()).max() <= 1e-4, i
    assert cache.capacity == 512
    # resuming from an earlier position overwrites the positions after it, as a fresh cache would
    again, _ = dec.step(np.asarray([[7]]), cache, 250)
    first, _ = dec.step(np.asarray([[7]]), dec.step(ids, None, 0)[1], 250)
    assert np.abs(again - first).max() <= 1e-5


def test_left_padded_batch_matches_torch(gqa, model):
    """The node gets the graph's additive mask as its attention_bias: padding is masked as in the
    plain graph (GroupQueryAttention's own sequence lengths only place the new keys)."""
    m, _ = model
    dec = OrtDecoder(gqa)
    ids = np.random.default_rng(1).integers(0, 400, size=(2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    pos = np.stack([np.arange(6), np.clip(np.arange(6) - 2, 0, None)]).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feed.update({n: np.zeros((2, h, 0, w), np.float32) for n, (h, w) in zip(dec.past_names, dec.cache_shapes)})
    got = dec.session.run(["logits"], feed)[0]
    with torch.no_grad():
        want = LatentLlama(m, "dense").eval()(torch.tensor(ids), torch.tensor(mask), torch.tensor(pos),
                                               *[torch.zeros(2, h, 0, w) for h, w in dec.cache_shapes])[0].numpy()
    assert np.abs(got[0] - want[0]).max() <= 1e-4 and np.abs(got[1, 2:] - want[1, 2:]).max() <= 1e-4


def test_optimum_loader_runs_the_gqa_graph(gqa, model):
    """optimum passes a growing past and reads present: the op then copies, as the plain graph does."""
    from optimum.onnxruntime import ORTModelForCausalLM

    m, tok = model
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    out = ORTModelForCausalLM.from_pretrained(gqa, use_cache=True).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out[0].tolist() == ref[0].tolist()


@pytest.mark.parametrize("kw,needle", [(dict(kv_cache="latent-v"), "needs the dense KV cache"),
                                       (dict(graph="optimum"), "written by the traced graph"),
                                       (dict(attention="flash"), "unknown attention")])
def test_refused_combinations(folder, tmp_path, kw, needle):
    with pytest.raises(SwiftSVDError, match=needle):
        export_onnx(folder, tmp_path / "out", **{"attention": "gqa", **kw})
    assert not (tmp_path / "out").exists()


def test_release_profile_takes_gqa_with_a_dense_cache_only(tmp_path):
    from swiftsvd_export.release.profiles import load_profile

    head = 'description = "laptop, GroupQueryAttention"\nformat = "onnx"\n[export]\nattention = "gqa"\n'
    (tmp_path / "ok.toml").write_text(head)
    assert load_profile("ok.toml", tmp_path).export == {"attention": "gqa"}
    (tmp_path / "bad.toml").write_text(head + 'kv_cache = "latent-v"\n')
    with pytest.raises(SwiftSVDError, match=r"bad.toml: \[export\] --attention gqa needs the dense KV cache"):
        load_profile("bad.toml", tmp_path)


def test_metadata_restore_keeps_the_attention(gqa, tmp_path):
    """When a quantizer or converter drops the metadata, the export writes back all a traced graph
    records, so the runtime still appends in place (not just the cache layout)."""
    import shutil

    from swiftsvd_export.backends.onnx.latent_export import traced_metadata, write_metadata

    folder = tmp_path / "copy"
    shutil.copytree(gqa, folder)
    model = onnx.load(str(folder / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(folder / "model.onnx"))
    assert not OrtDecoder(folder).shared_buffers
    write_metadata(folder / "model.onnx", traced_metadata("dense", "gqa"))
    dec = OrtDecoder(folder)
    assert dec.shared_buffers and dec.layout == "dense"
