"""CPU decode fast paths: out-of-place rope on strided slices, fused cache write + attention."""
from __future__ import annotations

import numpy as np
import pytest

from lstream.backends.cpu import attention, ops


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("n_tok", [1, 3, 20])
def test_rope_out_of_place_matches_inplace(neox, n_tok):
    rng = np.random.default_rng(n_tok)
    n_head, hd, n_rot = 5, 16, 12  # n_rot < head_dim: the tail is copied
    qkv = rng.standard_normal((n_tok, n_head * hd + 40), dtype=np.float32)
    x = qkv[:, 8:8 + n_head * hd]  # a row-strided column slice
    ang = rng.uniform(0, 6, (n_tok, n_rot // 2))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    ref = np.array(x).reshape(n_tok, n_head, hd)
    ops.rope_inplace(ref, cos, sin, n_rot, neox)
    got = ops.rope(x, cos, sin, n_head, hd, n_rot, neox)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("window", [0, 5])
def test_attention_dec_matches_cache_write_then_attention(window):
    rng = np.random.default_rng(window)
    n_head, n_kv, hd, n_past = 6, 2, 32, 11
    kc = rng.standard_normal((40, n_kv, hd), dtype=np.float32)
    vc = rng.standard_normal((40, n_kv, hd), dtype=np.float32)
    qkv = rng.standard_normal((1, (n_head + 2 * n_kv) * hd), dtype=np.float32)
    q = np.ascontiguousarray(qkv[:, :n_head * hd])
    k, v = qkv[:, n_head * hd:(n_head + n_kv) * hd], qkv[:, (n_head + n_kv) * hd:]
    kc2, vc2 = kc.copy(), vc.copy()
    kc2[n_past] = k.reshape(n_kv, hd)
    vc2[n_past] = v.reshape(n_kv, hd)
    ref = attention.attention(q, kc2, vc2, n_past, n_head, n_kv, hd, 0.3, window)
    out = np.empty_like(q)
    attention.attention_decode(q, k, v, kc, vc, n_past, n_head, n_kv, hd, np.float32(0.3), window, out)
    np.testing.assert_array_equal(kc, kc2)
    np.testing.assert_array_equal(vc, vc2)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    # against a float64 softmax
    s = n_past + 1
    lo = max(0, s - window) if window else 0
    for h in range(n_head):
        kh = h // (n_head // n_kv)
        sc = (kc2[lo:s, kh].astype(np.float64) @ q[0, h * hd:(h + 1) * hd]) * 0.3
        p = np.exp(sc - sc.max())
        p /= p.sum()
        np.testing.assert_allclose(out[0, h * hd:(h + 1) * hd], p @ vc2[lo:s, kh], rtol=0, atol=2e-5)


def _ref_attention(q, kc, vc, n_past, n_head, n_kv, hd, scale, window):
    """float64 numpy reference: causal (and windowed) grouped-query softmax(q k^T * scale) v."""
    n_tok = q.shape[0]
    out = np.empty((n_tok, n_head * hd))
    for t in range(n_tok):
        pos = n_past + t
        lo = max(0, pos - window + 1) if window else 0
        for h in range(n_head):
            kh = h // (n_head // n_kv)
            s = (kc[lo:pos + 1, kh].astype(np.float64) @ q[t, h * hd:(h + 1) * hd].astype(np.float64)) * scale
            p = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = (p / p.sum()) @ vc[lo:pos + 1, kh].astype(np.float64)
    return out


def _nmse(a, ref):
    return float(((a - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.mark.parametrize("n_head,n_kv,hd,n_past,n_tok,window,blk", [
    (9, 3, 64, 2100, 1, 0, 256),     # SmolLM2 at depth: 9 blocks, the last one partial
    (4, 1, 256, 1500, 1, 0, 64),     # Gemma 3: one kv head, many blocks
    (4, 1, 256, 1500, 1, 512, 64),   # sliding window: leading blocks empty
    (8, 8, 32, 700, 3, 0, 100),      # MHA, 3 decode tokens (causal per token inside the last block)
    (6, 2, 32, 40, 2, 0, 16),        # short
    (32, 8, 128, 600, 1, 0, 128),    # Llama-3 8B heads
])
def test_split_decode_attention_matches_serial_and_reference(n_head, n_kv, hd, n_past, n_tok, window, blk):
    """Decode attention over key blocks and threads (split-K + combine) = the serial per-row kernel and
    a float64 reference within float32 rounding (NMSE < 1e-11; measured ~1e-13 - 1e-12)."""
    rng = np.random.default_rng(n_past)
    s = n_past + n_tok
    q = (rng.standard_normal((n_tok, n_head * hd)) * 2).astype(np.float32)  # peaked softmaxes too
    kc = rng.standard_normal((s + 5, n_kv, hd), dtype=np.float32)
    vc = rng.standard_normal((s + 5, n_kv, hd), dtype=np.float32)
    scale = np.float32(hd ** -0.5)
    args = (q, kc, vc, n_past, n_head, n_kv, hd, scale, window)
    ser = np.empty_like(q)
    attention.attention_serial(*args, ser)
    got = np.empty_like(q)
    attention.attention_split(*args, got, blk)
    ref = _ref_attention(*args)
    assert _nmse(got, ser) < 1e-11
    assert _nmse(got, ref) < 1e-11 and _nmse(ser, ref) < 1e-11
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    one = np.empty_like(q)
    attention.attention_onepass(*args, one)  # the same kernels, one block, one thread
    assert _nmse(one, ref) < 1e-11
    # the decode entry point (cache write + attention: split or one pass by the size)
    if n_tok == 1:
        k_new = kc[n_past:n_past + 1].reshape(1, -1).copy()
        v_new = vc[n_past:n_past + 1].reshape(1, -1).copy()
        dec = np.empty_like(q)
        attention.attention_decode(q, k_new, v_new, kc, vc, n_past, n_head, n_kv, hd, scale, window, dec)
        assert _nmse(dec, ref) < 1e-11
