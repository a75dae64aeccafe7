"""The float16 mirror of a host layer's K/V cache that CPU decode attention reads (backends/cpu/host_kv.py):
the kernel against a float64 reference, the rows it catches up, the fallback beyond float16's range,
and the mirror's rows forgotten when the sequence goes back (a new prompt over an old one)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lstream.backends.cpu import attention, host_kv
from lstream.backends.cpu.host_kv import HostKV

from test_cpu_decode_ops import _nmse, _ref_attention

pytestmark = pytest.mark.skipif(not host_kv.HALF_DECODE, reason="no AVX2/F16C on this host: decode reads float32")


def _half(a):
    return a.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("n_head,n_kv,hd,n_past,n_tok,window", [
    (9, 3, 64, 2100, 1, 0),     # SmolLM2 at depth: keys not a multiple of 8 (the one-key tail)
    (4, 1, 256, 1500, 1, 512),  # Gemma 3's head, a sliding window
    (8, 8, 32, 700, 3, 0),      # MHA, 3 tokens
    (6, 2, 32, 5, 2, 0),        # shorter than one 8-key group
    (32, 8, 128, 600, 1, 0),    # Llama-3 8B heads
])
def test_half_decode_is_attention_over_the_rounded_cache(n_head, n_kv, hd, n_past, n_tok, window):
    """attention_decode_half = a float64 reference over the float16-rounded K/V within float32 rounding
    (NMSE < 1e-11), within float16 rounding of the float32 cache's (NMSE < 1e-5); writes the new rows
    into the float32 cache exactly and converts every row up to them (the mirror starts empty)."""
    rng = np.random.default_rng(n_past + hd)
    s = n_past + n_tok
    q = (rng.standard_normal((n_tok, n_head * hd)) * 2).astype(np.float32)
    kc = rng.standard_normal((s + 5, n_kv, hd), dtype=np.float32) * 3
    vc = rng.standard_normal((s + 5, n_kv, hd), dtype=np.float32)
    k_new = kc[n_past:s].reshape(n_tok, -1).copy()
    v_new = vc[n_past:s].reshape(n_tok, -1).copy()
    ref32 = _ref_attention(q, kc, vc, n_past, n_head, n_kv, hd, hd ** -0.5, window)
    ref16 = _ref_attention(q, _half(kc), _half(vc), n_past, n_head, n_kv, hd, hd ** -0.5, window)
    k32, v32 = np.zeros_like(kc), np.zeros_like(vc)
    k32[:n_past], v32[:n_past] = kc[:n_past], vc[:n_past]
    kh, vh = np.zeros(kc.shape, np.uint16), np.zeros(vc.shape, np.uint16)
    out = np.empty_like(q)
    n = attention.attention_decode_half(q, k_new, v_new, k32, v32, kh, vh, 0, n_past, n_head, n_kv, hd,
                                        np.float32(hd ** -0.5), window, out)
    assert n == s
    np.testing.assert_array_equal(k32[:s], kc[:s])
    np.testing.assert_array_equal(v32[:s], vc[:s])
    np.testing.assert_array_equal(kh[:s].view(np.float16), kc[:s].astype(np.float16))
    assert _nmse(out, ref16) < 1e-11
    assert _nmse(out, ref32) < 1e-5


def test_rows_written_since_are_caught_up_and_old_ones_kept():
    """Rows [n_half, n_past) come from the float32 cache (a prefill wrote them); rows below n_half are
    the mirror's as they are (the kernel does not read them again)."""
    rng = np.random.default_rng(1)
    n_head, n_kv, hd, n_past = 4, 2, 64, 300
    kc = rng.standard_normal((320, n_kv, hd), dtype=np.float32)
    vc = rng.standard_normal((320, n_kv, hd), dtype=np.float32)
    kh, vh = kc.astype(np.float16).view(np.uint16), vc.astype(np.float16).view(np.uint16)
    kh[:100], vh[:100] = kh[:100].copy(), vh[:100].copy()
    kc[100:n_past] += 1.0  # written after the mirror's 100 rows
    q = rng.standard_normal((1, n_head * hd)).astype(np.float32)
    k_new, v_new = rng.standard_normal((2, 1, n_kv * hd)).astype(np.float32)
    out = np.empty_like(q)
    n = attention.attention_decode_half(q, k_new, v_new, kc, vc, kh, vh, 100, n_past, n_head, n_kv, hd,
                                        np.float32(0.125), 0, out)
    assert n == n_past + 1
    np.testing.assert_array_equal(kh[100:n_past + 1].view(np.float16), kc[100:n_past + 1].astype(np.float16))
    ref = _ref_attention(q, _half(kc), _half(vc), n_past, n_head, n_kv, hd, 0.125, 0)
    assert _nmse(out, ref) < 1e-11


def test_beyond_float16_reads_float32_and_gives_up_the_mirror():
    """A K value beyond 65504 (as some models' activations are): -1, and the float32 kernel's output."""
    rng = np.random.default_rng(2)
    n_head, n_kv, hd, n_past = 4, 2, 32, 50
    kc = rng.standard_normal((60, n_kv, hd), dtype=np.float32)
    vc = rng.standard_normal((60, n_kv, hd), dtype=np.float32)
    kc[7, 1, 3] = 1.0e5
    q = rng.standard_normal((1, n_head * hd)).astype(np.float32) * 1e-4
    k_new, v_new = rng.standard_normal((2, 1, n_kv * hd)).astype(np.float32)
    want = np.empty_like(q)
    kc2, vc2 = kc.copy(), vc.copy()
    attention.attention_decode(q, k_new, v_new, kc2, vc2, n_past, n_head, n_kv, hd, np.float32(0.2), 0, want)
    out = np.empty_like(q)
    kh, vh = np.zeros(kc.shape, np.uint16), np.zeros(vc.shape, np.uint16)
    n = attention.attention_decode_half(q, k_new, v_new, kc, vc, kh, vh, 0, n_past, n_head, n_kv, hd,
                                        np.float32(0.2), 0, out)
    assert n == -1
    np.testing.assert_array_equal(out, want)
    kv = HostKV(kc, vc)
    kv.n_half[0] = n
    assert not kv.half(host_kv.HALF_FROM)
    kv.rewritten_from(0)  # going back does not bring it back
    assert kv.n_half[0] == -1


def test_catch_up_converts_a_prompts_rows_over_the_threads():
    """HostKV.catch_up (a prompt's end): the rows since the mirror's count, rounded as numpy rounds to
    float16; a value beyond float16's range gives the mirror up; shallow caches are left alone."""
    rng = np.random.default_rng(5)
    n = host_kv.HALF_FROM + 40
    kv = HostKV(rng.standard_normal((n + 8, 2, 64), np.float32) * 300,
                rng.standard_normal((n + 8, 2, 64), np.float32))
    kv.catch_up(host_kv.HALF_FROM - 1)
    assert kv.n_half[0] == 0 and kv.kh is None
    kv.n_half[0] = 7  # rows before 7 already converted: left as they are
    kv.catch_up(n)
    if not host_kv.HALF_DECODE:
        assert kv.n_half[0] == 7
        return
    assert kv.n_half[0] == n
    for c, h in ((kv.k, kv.kh), (kv.v, kv.vh)):
        np.testing.assert_array_equal(h[7:n].view(np.float16), c[7:n].astype(np.float16))
    kv.v[n - 3, 1, 5] = 1e5
    kv.rewritten_from(n - 10)
    kv.catch_up(n)
    assert kv.n_half[0] == -1


def test_shallow_decode_reads_float32():
    kv = HostKV(np.zeros((8, 1, 64), np.float32), np.zeros((8, 1, 64), np.float32))
    assert not kv.half(host_kv.HALF_FROM - 1) and kv.kh is None
    assert kv.half(host_kv.HALF_FROM) and kv.kh.shape == (8, 1, 64) and kv.kh.dtype == np.uint16


def test_a_new_prompt_over_an_old_one_reads_its_own_rows(smollm2, monkeypatch):
    """Decode over the mirror after reset and a longer prompt (its rows written by the prefill, not
    the mirror) gives the logits of the same steps on a fresh cache: the old mirror rows were
    forgotten when the sequence went back, and rewinding inside a sequence forgets its tail too.
    (The mirror from 20 cached tokens here: the rule is the same at 1024.)"""
    monkeypatch.setattr(host_kv, "HALF_FROM", 20)
    m = smollm2
    first, second = list(range(100, 130)), list(range(200, 260))

    def run(prompts):
        outs = []
        for p in prompts:
            m.reset()
            m.eval(p)
            outs = [m.eval([t]) for t in (5, 6, 7, 8)]
        return outs

    m.reset()
    m.eval(second)
    assert all(kv.n_half[0] == len(second) for kv in m.kv.layers)  # converted at the prompt's end
    fresh = run([second])
    assert all(kv.n_half[0] == len(second) + 4 for kv in m.kv.layers)  # the decode read the mirrors
    again = run([first, second])
    for a, b in zip(fresh, again):
        np.testing.assert_array_equal(a, b)
    m.reset()
    m.eval(second)
    for t in (5, 6, 7, 8):
        m.eval([t])
    m.kv.truncate(len(second) + 1)  # back two tokens, different ones after
    tail = [m.eval([t]) for t in (9, 10)]
    m.reset()
    m.eval(second)
    m.eval([5])
    want = [m.eval([t]) for t in (9, 10)]
    for a, b in zip(tail, want):
        np.testing.assert_array_equal(a, b)


def test_option_turns_the_mirror_off():
    """LSTREAM_HOST_KV=f32 (Options.host_kv_half=False): decode reads float32 at every depth."""
    from lstream.backends.cpu import CPUBackend
    from lstream.core.options import Options
    assert Options.from_env({"LSTREAM_HOST_KV": "f32"}).host_kv_half is False
    assert Options.from_env({}).host_kv_half is True
    # (alloc_kv reads only the options: no backend started, no thread count changed)
    off = CPUBackend.alloc_kv(SimpleNamespace(options=Options(host_kv_half=False)), 0, 8, 1, 64)
    on = CPUBackend.alloc_kv(SimpleNamespace(options=Options()), 0, 8, 1, 64)
    assert not off.half(host_kv.HALF_FROM) and on.half(host_kv.HALF_FROM)
