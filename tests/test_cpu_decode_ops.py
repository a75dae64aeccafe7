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
