"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMS norms) graphs on tiny random checkpoints written
by transformers, loaded by lstream from the safetensors directory and from a GGUF written with the
gguf package (q/k unpermuted: qwen rotates halves, "neox"), against transformers' float32 logits."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import lstream  # noqa: E402
from lstream.loaders.names import canonical_from_hf  # noqa: E402

N_TOKENS = 48
MAX_NMSE = 1e-10  # float32 end to end: differences are only rounding (measured ~6e-13)
MAX_ABS = 5e-5  # measured ~3e-6 on logits of magnitude ~1


def _tiny(arch: str):
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.1)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)  # head_dim != 64/4
    return transformers.Qwen3ForCausalLM(cfg)


def write_gguf(model, arch: str, path) -> None:
    """The checkpoint as a GGUF the way llama.cpp's converter writes qwen: same names as
    canonical_from_hf, q/k not permuted, float32 tensors."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_vocab_size(c.vocab_size)
    for name, t in model.state_dict().items():
        canon = canonical_from_hf(name, arch)
        if canon is None or (canon == "output.weight" and c.tie_word_embeddings):
            continue
        w.add_tensor(canon, t.detach().float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    arch = request.param
    torch.manual_seed(0)
    model = _tiny(arch).float().eval()
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    d = tmp_path_factory.mktemp(arch)
    model.save_pretrained(d / "st")
    write_gguf(model, arch, d / f"{arch}.gguf")
    ids = torch.randint(0, model.config.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    return arch, d, ids[0].tolist(), ref


def _check(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    nmse = ((ours - ref) ** 2).sum() / (ref ** 2).sum()
    err = np.abs(ours - ref).max()
    print(f"\n{what}: max abs {err:.2e} nmse {nmse:.2e}")
    assert ours.shape == ref.shape
    assert nmse < MAX_NMSE and err < MAX_ABS
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_logits_match_transformers(tiny, fmt):
    arch, d, ids, ref = tiny
    path = d / "st" if fmt == "safetensors" else d / f"{arch}.gguf"
    with lstream.load(str(path), n_ctx=128, load_tokenizer=False) as m:
        assert m.config.arch == arch and m.config.rope_mode == "neox"
        ops = {n.op.value for n in m.graph.nodes}
        assert ("rms_norm_heads" in ops) == (arch == "qwen3")
        if arch == "qwen2":
            assert len(m.graph.nodes[2].weights) == 2  # blk.0.q with its bias
        _check(m.eval(ids, logits="all"), ref, f"{arch} {fmt}")
        # prefill in pieces then one decode step reads the same cache
        m.reset()
        m.eval(ids[:20])
        m.eval(ids[20:-1])
        last = m.eval(ids[-1:])
        _check(last[None], ref[-1:], f"{arch} {fmt} cached decode")
