"""Quantize on load: bit-exact GGUF blocks against gguf.quants.quantize, and a quantized tiny
checkpoint that runs through the CPU kernels close to its float logits."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lstream.core.qtypes import QType  # noqa: E402
from lstream.loaders.quantize import quantize_rows, to_float32  # noqa: E402

GG = {QType.Q8_0: gguf.GGMLQuantizationType.Q8_0, QType.Q4_0: gguf.GGMLQuantizationType.Q4_0}


def _awkward(rng) -> np.ndarray:
    x = (rng.standard_normal((48, 256)) * rng.uniform(1e-3, 10, (48, 1))).astype(np.float32)
    x[0, :32] = 0  # all-zero block: d = 0
    x[1, 3] = 1e4  # one outlier
    x[2, :32] = -x[2, :32].max()  # max magnitude negative and repeated (first index wins)
    x[3] = np.round(x[3] * 2) / 2  # exact halves: roundf rounds away from zero
    x[4, :64] = np.arange(64, dtype=np.float32) * 0.5 - 16
    return x


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0])
@pytest.mark.parametrize("src", [QType.F32, QType.F16, QType.BF16])
def test_blocks_bit_exact_against_gguf(qtype, src):
    x = _awkward(np.random.default_rng(0))
    if src == QType.F16:
        raw = x.astype(np.float16)
    elif src == QType.BF16:
        raw = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(48, -1)
    else:
        raw = x
    ours = quantize_rows(qtype, src, raw, 48, 256)
    ref = gguf.quants.quantize(to_float32(src, raw).reshape(48, 256), GG[qtype])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_rejects_rows_not_multiple_of_block():
    with pytest.raises(ValueError, match="multiple"):
        quantize_rows(QType.Q8_0, QType.F32, np.zeros((2, 40), np.float32), 2, 40)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=320, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, initializer_range=0.1)
    d = tmp_path_factory.mktemp("tiny_q")
    transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d


@pytest.mark.parametrize("qtype,max_nmse", [("q8_0", 3e-3), ("q4_0", 0.25)])  # random weights: 4-bit noise is large
def test_quantized_checkpoint_runs_close_to_float(tiny_dir, qtype, max_nmse):
    import lstream
    ids = list(range(5, 69))
    with lstream.load(str(tiny_dir), n_ctx=128, load_tokenizer=False) as m:
        ref = m.eval(ids, logits="all")
    with lstream.load(str(tiny_dir), n_ctx=128, load_tokenizer=False, quantize=qtype) as m:
        r = m.residency
        assert r["blk.0.attn_q.weight"].qtype == QType[qtype.upper()]
        assert r["blk.0.attn_q.weight"].state.value == "host"
        assert r["blk.0.attn_norm.weight"].qtype == QType.BF16 and r["blk.0.attn_q.bias"].qtype == QType.BF16
        assert r["token_embd.weight"].qtype == QType.Q8_0  # the tied head stays at 8 bits
        assert r["output.weight"].alias_of == "token_embd.weight" and r["output.weight"].qtype == QType.Q8_0
        assert "quantized" in m.loaded.metadata["lstream.quantized"]
        ours = m.eval(ids, logits="all")
    nmse = ((ours - ref) ** 2).sum() / (ref ** 2).sum()
    print(f"\n{qtype}: nmse vs bf16 {nmse:.2e}")
    assert nmse < max_nmse
