"""Gemma 3: tiny random checkpoints written by transformers (safetensors, and GGUF through the gguf
package with norms stored as 1 + w), and the real Gemma 3 270M Q4_K_M GGUF against transformers
loading the same file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import lstream  # noqa: E402
from lstream.loaders.names import canonical_from_hf  # noqa: E402

DATA = Path(__file__).parent / "data"
N_TINY = 40  # > the tiny sliding window (8): local layers really see only their window


def _nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    lg = logits.astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (np.log(np.exp(lg - m).sum(-1, keepdims=True)) + m)[:, 0]
    return lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]


def _tiny_model(variant: str):
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=8,
              initializer_range=0.1, hidden_activation="gelu_pytorch_tanh")
    if variant == "gguf-compatible":  # what a GGUF can say: pattern of 6, local base 10000, scale 1/sqrt(head_dim)
        cfg = transformers.Gemma3TextConfig(**kw, num_hidden_layers=6, query_pre_attn_scalar=32)
    else:  # config.json only: explicit layer types, own local RoPE base, linear RoPE scaling on
        # global layers (as Gemma 3 4B+), other attention scale
        cfg = transformers.Gemma3TextConfig(
            **kw, num_hidden_layers=4, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}})
    return transformers.Gemma3ForCausalLM(cfg)


def write_gguf(model, path) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_sliding_window(c.sliding_window)
    for name, t in model.state_dict().items():
        canon = canonical_from_hf(name, "gemma3")
        if canon is None or canon == "output.weight":
            continue
        a = t.detach().float().numpy().copy()
        if canon.endswith("norm.weight"):
            a = a + 1  # llama.cpp's converter stores Gemma norms as 1 + w
        w.add_tensor(canon, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["gguf-compatible", "config-only"])
def tiny(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _tiny_model(request.param).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)  # transformers starts Gemma norms at 0 (scale 1 + 0)
    d = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(d / "st")
    if request.param == "gguf-compatible":
        write_gguf(model, d / "tiny.gguf")
    ids = torch.randint(0, 320, (1, N_TINY), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    return request.param, d, ids[0].tolist(), ref


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_tiny_logits_match_transformers(tiny, fmt):
    variant, d, ids, ref = tiny
    if fmt == "gguf" and variant != "gguf-compatible":
        pytest.skip("a GGUF cannot state these layer types")
    path = d / "st" if fmt == "safetensors" else d / "tiny.gguf"
    with lstream.load(str(path), n_ctx=64, load_tokenizer=False) as m:
        assert m.config.arch == "gemma3"
        windows = [n.params.get("window", 0) for n in m.graph.nodes if n.op.value == "attention"]
        assert windows == [0 if t == "full_attention" else 8 for t in
                           transformers.AutoConfig.from_pretrained(d / "st").layer_types]
        ours = m.eval(ids, logits="all")
        m.reset()
        m.eval(ids[:-3])
        step = np.stack([m.eval([t]) for t in ids[-3:]])
    nmse = ((ours - ref) ** 2).sum() / (ref ** 2).sum()
    print(f"\ntiny gemma3 {variant} {fmt}: nmse {nmse:.2e} max abs {np.abs(ours - ref).max():.2e}")
    assert nmse < 1e-10 and np.abs(ours - ref).max() < 1e-4
    np.testing.assert_allclose(step, ref[-3:], atol=1e-4, rtol=0)


# -- the real model --------------------------------------------------------------------------------

N_REAL = 256  # acceptance asks for >= 256 tokens


@pytest.fixture(scope="module")
def gemma_path():
    from lstream.loaders.registry import PullError, pull
    try:
        return pull("gemma3-270m", quiet=True)
    except PullError as e:
        pytest.skip(f"gemma3-270m not available: {e}")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    m = lstream.load(str(gemma_path), n_ctx=1024)
    yield m
    m.close()


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name,
                                             dtype=torch.float32)
    return m.eval()


def test_real_config_and_template(gemma):
    cfg = gemma.config
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.head_dim, cfg.n_head_kv) == ("gemma3", 18, 640, 256, 1)
    windows = [n.params.get("window", 0) for n in gemma.graph.nodes if n.op.value == "attention"]
    assert windows == [0 if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert 106 in cfg.eos_ids  # <end_of_turn>
    # the GGUF has no chat template: the built-in Gemma turn format is used
    assert "built-in" in gemma.loaded.metadata["lstream.chat_template"]
    text = gemma.tokenizer.apply_chat([{"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_real_logits_match_transformers(gemma, hf_gemma):
    ids = gemma.tokenize((DATA / "declaration.txt").read_text(), bos=True)[:N_REAL]
    with torch.no_grad():
        ref = hf_gemma(torch.tensor([ids])).logits[0].numpy()
    gemma.reset()
    ours = gemma.eval(ids, logits="all")
    ppl, ppl_ref = np.exp(_nll(ours, ids).mean()), np.exp(_nll(ref, ids).mean())
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    nmse = ((ours - ref) ** 2).sum() / (ref ** 2).sum()
    print(f"\ngemma3-270m {len(ids)} tokens: ppl lstream {ppl:.4f} transformers {ppl_ref:.4f} "
          f"({ppl / ppl_ref - 1:+.2%}) top-1 {top1:.4f} nmse {nmse:.2e}")
    assert abs(ppl / ppl_ref - 1) < 0.01 and top1 >= 0.95
    assert nmse < 1e-6  # int16 activations in the CPU kernels: ~7e-8 (int8 ones gave ~4e-3 here)


def test_real_greedy_32_equals_transformers(gemma, hf_gemma):
    prompt = "The Declaration of Independence was signed in"
    ids = gemma.tokenize(prompt, bos=True)
    gemma.reset()
    ours = list(gemma.generate_tokens(ids, 32, stop_at_eos=False))
    gemma.reset()
    with torch.no_grad():
        out = hf_gemma.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    ref = out[0, len(ids):].tolist()
    print(f"\n{gemma.tokenizer.decode(ours)!r}")
    assert ours == ref
