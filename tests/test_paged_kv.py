"""The paged K/V cache (core/paged_kv.py), the CPU paged attention against the contiguous cache's
(bitwise), the 4-token row dots against the one-token ones (bitwise), and the request text stream
(stop strings, UTF-8) of core/serve_request.py."""
from __future__ import annotations

import numpy as np
import pytest

from lstream.core.paged_kv import BlockPool, PagedKVCache, PoolExhausted, SeqBatch, block_keys
from lstream.core.serve_request import TextStream


class _KV:  # what PagedKVCache reads of a model's KVCache
    def __init__(self, n_ctx, n_layer=1, n_kv=2, hd=16):
        from lstream.backends.cpu.backend import HostKV
        self.n_ctx, self.homes = n_ctx, ["cpu"] * n_layer
        self.layers = [HostKV(np.zeros((n_ctx, n_kv, hd), np.float32), np.zeros((n_ctx, n_kv, hd), np.float32))
                       for _ in range(n_layer)]


def test_pool_reuses_registered_blocks_last():
    pool = BlockPool(3)
    a, b = pool.alloc(), pool.alloc()
    pool.register(a, ("k", 1))
    pool.release(a)
    pool.release(b)
    assert pool.n_used == 0
    # the unregistered block and the never-used one come first; the registered one last
    got = [pool.alloc() for _ in range(3)]
    assert got[-1] == a and ("k", 1) not in pool.index
    with pytest.raises(PoolExhausted):
        pool.alloc()


def test_prefix_reuse_whole_blocks_and_never_the_last_token():
    paged = PagedKVCache(_KV(64), block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks
    s1 = paged.open(prompt)
    assert s1.n == 0
    paged.reserve(s1, len(prompt))
    paged.append(s1, prompt)
    assert len(s1.keys) == 2
    first = list(s1.blocks)
    paged.close(s1)
    s2 = paged.open(prompt + [7, 8])
    assert s2.n_reused == 8 and s2.blocks == first[:2] and s2.tokens == prompt[:8]
    s3 = paged.open(prompt[:8])  # 8 tokens: only 1 block may be reused (the 8th is evaluated)
    assert s3.n_reused == 4
    s4 = paged.open([1] + prompt[1:])  # first token differs: nothing
    assert s4.n_reused == 0
    s5 = paged.open(prompt, reuse=False)
    assert s5.n_reused == 0
    for s in (s2, s3, s4, s5):
        paged.close(s)
    assert paged.pool.n_used == 0


def test_block_keys_chain():
    k1 = block_keys([1, 2, 3, 4, 5, 6], 2)
    k2 = block_keys([9, 2, 3, 4, 5, 6], 2)
    assert len(k1) == 3 and k1[1][1] == k2[1][1] and k1[1] != k2[1]  # same tokens, other history


def test_seq_batch_slots_and_tables():
    paged = PagedKVCache(_KV(64), block_size=4)
    a, b = paged.open([]), paged.open([])
    paged.reserve(a, 6)
    paged.reserve(b, 1)
    batch = SeqBatch.build(paged, [a, b], [6, 1], np.array([5, 6]))
    bs = 4
    assert list(batch.seq) == [0] * 6 + [1]
    assert batch.slots[5] == a.blocks[1] * bs + 1 and batch.slots[6] == b.blocks[0] * bs
    assert batch.tables.shape == (2, 2) and list(batch.tables[0]) == a.blocks


@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_matches_contiguous(window):
    """Three sequences in one ubatch (a 9-token chunk, two decode tokens) over scattered blocks: each
    row is the contiguous cache's attention of that sequence alone, to float32 rounding (the
    contiguous decode kernel sums 8 keys per vector lane, the paged one key after key; that the
    paged rows do not depend on the rest of the batch is test_batching's bit-for-bit test)."""
    from lstream.backends.cpu import attention as A
    from lstream.backends.cpu.attention_paged import attention_paged
    rng = np.random.default_rng(0)
    n_head, n_kv, hd, bs = 4, 2, 16, 4
    kv = _KV(128, n_kv=n_kv, hd=hd)
    paged = PagedKVCache(kv, block_size=bs)
    paged.pool.free.rotate(5)  # blocks out of order
    lens, news = [7, 13, 2], [9, 1, 1]
    seqs, hist = [], []
    for n_past in lens:  # earlier tokens' K/V, written through the table
        s = paged.open([])
        paged.reserve(s, n_past)
        k = rng.standard_normal((n_past, n_kv, hd)).astype(np.float32)
        v = rng.standard_normal((n_past, n_kv, hd)).astype(np.float32)
        sl = paged.slots(s, 0, n_past)
        kv.layers[0].k[sl], kv.layers[0].v[sl] = k, v
        paged.append(s, [0] * n_past)
        seqs.append(s)
        hist.append((k, v))
    for s, c in zip(seqs, news):
        paged.reserve(s, c)
    batch = SeqBatch.build(paged, seqs, news)
    t = sum(news)
    q = rng.standard_normal((t, n_head * hd)).astype(np.float32)
    k_new = rng.standard_normal((t, n_kv * hd)).astype(np.float32)
    v_new = rng.standard_normal((t, n_kv * hd)).astype(np.float32)
    pos = np.concatenate([np.arange(n, n + c) for n, c in zip(lens, news)])
    out = attention_paged(q, k_new, v_new, kv.layers[0], batch, pos, n_head, n_kv, hd, hd ** -0.5, window)
    r0 = 0
    for (k, v), n_past, c in zip(hist, lens, news):
        kc = np.zeros((64, n_kv, hd), np.float32)
        vc = np.zeros_like(kc)
        kc[:n_past], vc[:n_past] = k, v
        ref = np.empty((c, n_head * hd), np.float32)
        A.attention_decode(q[r0:r0 + c], k_new[r0:r0 + c], v_new[r0:r0 + c], kc, vc, n_past, n_head, n_kv, hd,
                           np.float32(hd ** -0.5), window, ref)
        np.testing.assert_allclose(out[r0:r0 + c], ref, rtol=1e-5, atol=1e-6)
        r0 += c


@pytest.mark.parametrize("layout_type", ["Q4_1", "Q8_0"])
def test_four_token_dots_bitwise_as_one_token(layout_type):
    """matmul_int with 4+ tokens (matmul_multi's row dots) gives each token the one-token result."""
    from lstream.backends.cpu import matmul_int
    from lstream.backends.cpu.weights import pack
    from lstream.core.qtypes import QType
    from lstream.tools.synth_model import random_tensor
    rng = np.random.default_rng(1)
    qt = QType[layout_type]
    raw = random_tensor(rng, "w", (40, 96), qt)
    w = pack(qt, raw, 40, 96, frozenset({QType.Q8_0}))
    x = rng.standard_normal((9, 96)).astype(np.float32)
    nb = 3

    def mm(xx):
        n = xx.shape[0]
        out = np.empty((n, 40), np.float32)
        matmul_int.mm_dec(*w.kernel_args(), xx, np.empty((n, 96), np.int16), np.empty((n, nb), np.float32),
                          np.empty((n, nb), np.float32), out)
        return out
    full = mm(x)
    for i in range(9):
        np.testing.assert_array_equal(mm(x[i:i + 1])[0], full[i])


def test_text_stream_stop_strings_and_utf8():
    vocab = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "!"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)
    ts = TextStream(decode, ["o w", "xyz"])
    assert ts.push(1) == ("Hel", False)
    assert ts.push(2) == ("l", False)  # "lo" ends with "o", which may begin "o w": held
    assert ts.push(3) == ("", True)  # "o wo" holds the stop string: nothing after "Hell" is sent
    assert ts.text == "Hell"
    ts = TextStream(decode, ["zz"])
    out = "".join(ts.push(i)[0] for i in (1, 2, 3, 4, 5)) + ts.flush()
    assert out == "Hello world!"


def test_text_stream_waits_for_whole_characters():
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
    ts = TextStream(decode, [])
    assert ts.push(1)[0] == "caf"
    assert ts.push(2)[0] == ""  # half a character
    assert ts.push(3)[0] == "\u00e9!"
