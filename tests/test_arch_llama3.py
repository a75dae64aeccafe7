"""Llama 3 RoPE scaling on a tiny random checkpoint written by transformers: from config.json
(rope_parameters, llama3) and from a GGUF written the way llama.cpp's converter writes llama
(q/k permuted for adjacent-pair RoPE, scaling as the rope_freqs.weight factors)."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import lstream  # noqa: E402
from lstream.loaders.names import canonical_from_hf  # noqa: E402

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0}  # short: scaling matters at 64 tokens


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf: HF halves layout -> adjacent pairs per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_factors(head_dim: int) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors for rope_type llama3."""
    freqs = 1.0 / (ROPE["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old, lo, hi, f = ROPE["original_max_position_embeddings"], ROPE["low_freq_factor"], ROPE["high_freq_factor"], ROPE["factor"]
    out = []
    for fr in freqs:
        wavelen = 2 * math.pi / fr
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(f)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / f + smooth))
    return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, rope_parameters=dict(ROPE), initializer_range=0.1,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    d = tmp_path_factory.mktemp("llama3")
    model.save_pretrained(d / "st")
    w = gguf.GGUFWriter(str(d / "tiny.gguf"), "llama")
    for fn, v in ((w.add_block_count, 2), (w.add_context_length, 256), (w.add_embedding_length, 64),
                  (w.add_feed_forward_length, 96), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                  (w.add_vocab_size, 320)):
        fn(v)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(ROPE["rope_theta"])
    w.add_tensor("rope_freqs.weight", _rope_factors(16))
    for name, t in model.state_dict().items():
        canon = canonical_from_hf(name)
        a = t.detach().float().numpy().copy()
        if canon.endswith("attn_q.weight"):
            a = _permute(a, 4)
        elif canon.endswith("attn_k.weight"):
            a = _permute(a, 2)
        w.add_tensor(canon, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    return d, ids[0].tolist(), ref


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_llama3_rope_scaling_matches_transformers(tiny, fmt):
    d, ids, ref = tiny
    path = d / "st" if fmt == "safetensors" else d / "tiny.gguf"
    with lstream.load(str(path), n_ctx=128, load_tokenizer=False) as m:
        assert m.config.rope_mode == ("neox" if fmt == "safetensors" else "norm")
        assert m.config.rope_scaling  # llama3 parameters, or the GGUF's freq factors
        ours = m.eval(ids, logits="all")
    nmse = ((ours - ref) ** 2).sum() / (ref ** 2).sum()
    print(f"\nllama3 {fmt}: nmse {nmse:.2e} max abs {np.abs(ours - ref).max():.2e}")
    assert nmse < 1e-10
