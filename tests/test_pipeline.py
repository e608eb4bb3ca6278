"""End to end on a tiny Llama made in the test: compress, save, load, perplexity, GQA shapes."""
import math

import pytest
import torch

from swiftsvd_export import load
from swiftsvd_export.compress import CompressConfig, compress, compress_model
from swiftsvd_export.lowrank import LowRankLinear, save_lowrank
from swiftsvd_export.models import load_model
from swiftsvd_export.perplexity import perplexity

from .conftest import WIKI_TEST, make_tiny_llama


def _cfg(model, out, **kw):
    base = dict(nsamples=8, seqlen=64, batch_size=4, progress=False, dtype="fp32")
    base.update(kw)
    return CompressConfig(model=str(model), output=str(out) if out else None, **base)


def test_compress_save_load_round_trip_and_ppl(tiny_model_dir, calib_txt, tmp_path):
    out = tmp_path / "c"
    s = compress(_cfg(tiny_model_dir, out, ratio=0.4, calib=str(calib_txt)))
    assert 0.39 < s["achieved_ratio"] < 0.45
    assert s["weights_bytes"] < (tiny_model_dir / "model.safetensors").stat().st_size
    assert 0 < s["normalized_reconstruction_error"] < 1
    model = load(out)
    n_lr = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert n_lr == s["factorized_linears"] == 14
    # GQA: k/v project to n_kv_heads * head_dim = 2 * 16
    k = model.model.layers[0].self_attn.k_proj
    assert (k.B.weight.shape[0], k.A.weight.shape[1]) == (32, 64)
    # the loaded folder gives the same logits as the in-memory compressed model
    dense, tok, _ = load_model(str(tiny_model_dir))
    cr = compress_model(dense, tok, _cfg(tiny_model_dir, None, ratio=0.4, calib=str(calib_txt)))
    ids = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        assert torch.equal(cr.model(ids).logits, model(ids).logits)
    text = WIKI_TEST.read_text()[:20000]
    r = perplexity(model, tok, text, seqlen=64, progress=False)
    assert r["tokens_scored"] == r["windows"] * 63 and math.isfinite(r["ppl"])


def test_fp16_save_is_lossless_for_fp16_weights(tmp_path):
    model = make_tiny_llama(seed=3)
    lin = model.model.layers[1].mlp.up_proj
    U, S, Vh = torch.linalg.svd(lin.weight.data, full_matrices=False)
    model.model.layers[1].mlp.up_proj = LowRankLinear.from_factors(Vh[:16], U[:, :16] * S[:16])
    with torch.no_grad():  # weights exactly representable in fp16 (buffers such as inv_freq untouched)
        for p in model.parameters():
            p.copy_(p.half().float())
    save_lowrank(model, tmp_path / "m", dtype="fp16")
    loaded = load(tmp_path / "m")
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_swift_beats_svd_and_matches_or_beats_whiten_on_real_activations(tiny_model_dir, calib_txt):
    errs = {}
    for method in ("swift", "whiten", "svd"):
        m, tok, _ = load_model(str(tiny_model_dir))
        errs[method] = compress_model(m, tok, _cfg(tiny_model_dir, None, ratio=0.5, method=method,
                                                   calib=str(calib_txt))).normalized_error
    assert errs["swift"] <= errs["whiten"] * (1 + 1e-6)
    assert errs["svd"] > 1.2 * errs["swift"]


def test_sequential_mode_runs_and_differs(tiny_model_dir, calib_txt):
    outs = []
    for seq in (False, True):
        m, tok, _ = load_model(str(tiny_model_dir))
        outs.append(compress_model(m, tok, _cfg(tiny_model_dir, None, ratio=0.5, sequential=seq,
                                                calib=str(calib_txt))))
    a = outs[0].model.model.layers[1].mlp.down_proj.A.weight
    b = outs[1].model.model.layers[1].mlp.down_proj.A.weight
    assert not torch.allclose(a, b)  # block 1 saw the compressed block 0's outputs
    # block 0 sees the same inputs in both modes
    assert torch.allclose(outs[0].model.model.layers[0].mlp.down_proj.A.weight,
                          outs[1].model.model.layers[0].mlp.down_proj.A.weight)


def test_nan_activations_are_reported(tiny_model_dir, calib_txt):
    m, tok, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    from swiftsvd_export.errors import SwiftSVDError

    with pytest.raises(SwiftSVDError, match="NaN or Inf in the activations at the input of model.layers.1.mlp.gate_proj"):
        compress_model(m, tok, _cfg(tiny_model_dir, None, ratio=0.4, calib=str(calib_txt)))
