"""Attention over the paged K/V cache (core/paged_kv.py) on the CPU: a ubatch whose tokens belong
to several sequences (a continuous-batching decode step) or a chunk of one sequence's prompt.

Each token's K/V are written into its slot, then each (token, head) row attends to its own
sequence's positions, read through the block table. The same row kernel is attention_serial's
(the contiguous cache as one block), the tests' reference.
Prompt chunks take the same row kernel (not attention.attention's sgemm path for long prompts):
a token's result never depends on what else is in the ubatch.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .vmath import vexp

from .jit import PAR as _JIT
from .jit import SER as _SER

PAGED_PAR_MIN = 32  # query rows x heads from which the rows are spread over the thread pool


@njit(**_SER)
def _row(q, kc, vc, tables, bs, srow, pos, g, hd, scale, window, t, h, sc, acc, out):
    """Query row t of head h over positions [lo, pos] of the sequence in tables row srow."""
    kh = h // g
    lo = 0
    if window > 0:
        lo = max(0, pos - window + 1)
    tab = tables[srow]
    qv = q[t, h * hd:(h + 1) * hd]
    mx = np.float32(-3.0e38)
    s = lo
    while s + 3 <= pos:  # 4 keys at a time: 4 independent reductions (latency-bound otherwise)
        k0 = kc[tab[s // bs] * bs + s % bs, kh]
        k1 = kc[tab[(s + 1) // bs] * bs + (s + 1) % bs, kh]
        k2 = kc[tab[(s + 2) // bs] * bs + (s + 2) % bs, kh]
        k3 = kc[tab[(s + 3) // bs] * bs + (s + 3) % bs, kh]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for d in range(hd):
            x = qv[d]
            a0 += x * k0[d]
            a1 += x * k1[d]
            a2 += x * k2[d]
            a3 += x * k3[d]
        sc[s - lo] = a0 * scale
        sc[s + 1 - lo] = a1 * scale
        sc[s + 2 - lo] = a2 * scale
        sc[s + 3 - lo] = a3 * scale
        s += 4
    while s <= pos:
        kv = kc[tab[s // bs] * bs + s % bs, kh]
        a = np.float32(0.0)
        for d in range(hd):
            a += qv[d] * kv[d]
        sc[s - lo] = a * scale
        s += 1
    for s in range(lo, pos + 1):
        if sc[s - lo] > mx:
            mx = sc[s - lo]
    n = pos + 1 - lo
    for s in range(n):
        sc[s] -= mx
    vexp(sc, 0, n)
    tot = np.float32(0.0)
    for s in range(n):
        tot += sc[s]
    inv = np.float32(1.0) / tot
    for d in range(hd):
        acc[d] = np.float32(0.0)
    for s in range(lo, pos + 1):
        p = sc[s - lo] * inv
        vv = vc[tab[s // bs] * bs + s % bs, kh]
        for d in range(hd):
            acc[d] += p * vv[d]
    o = out[t, h * hd:(h + 1) * hd]
    for d in range(hd):
        o[d] = acc[d]


@njit(**_SER)
def write_slots(k_new, v_new, kc, vc, slots, n_kv, hd):
    """k_new/v_new (T, n_kv*hd; row-strided views allowed) into the caches at slots[t]."""
    for t in range(k_new.shape[0]):
        r = slots[t]
        for kh in range(n_kv):
            for d in range(hd):
                kc[r, kh, d] = k_new[t, kh * hd + d]
                vc[r, kh, d] = v_new[t, kh * hd + d]


@njit(**_SER)
def paged_serial(q, k_new, v_new, kc, vc, slots, seq, pos, tables, bs, n_head, n_kv, hd, scale, window, out):
    write_slots(k_new, v_new, kc, vc, slots, n_kv, hd)
    g = n_head // n_kv
    sc = np.empty(pos.max() + 1, np.float32)
    acc = np.empty(hd, np.float32)
    for t in range(q.shape[0]):
        for h in range(n_head):
            _row(q, kc, vc, tables, bs, seq[t], pos[t], g, hd, scale, window, t, h, sc, acc, out)


@njit(**_JIT)
def _paged_rows(q, kc, vc, seq, pos, tables, bs, n_head, n_kv, hd, scale, window, out):
    n_tok = q.shape[0]
    g = n_head // n_kv
    s_max = pos.max() + 1
    for i in prange(n_tok * n_head):
        t = i // n_head
        h = i % n_head
        sc = np.empty(s_max, np.float32)
        acc = np.empty(hd, np.float32)
        _row(q, kc, vc, tables, bs, seq[t], pos[t], g, hd, scale, window, t, h, sc, acc, out)


@njit(**_SER)
def paged_parallel(q, k_new, v_new, kc, vc, slots, seq, pos, tables, bs, n_head, n_kv, hd, scale, window, out):
    write_slots(k_new, v_new, kc, vc, slots, n_kv, hd)
    _paged_rows(q, kc, vc, seq, pos, tables, bs, n_head, n_kv, hd, scale, window, out)


def _f32_rows(a):
    if a.ndim == 2 and a.dtype == np.float32 and a.strides[1] == 4:
        return a
    return np.ascontiguousarray(a, dtype=np.float32).reshape(a.shape[0], -1)


def attention_paged(q, k, v, store, batch, positions, n_head: int, n_kv: int, hd: int, scale: float,
                    window: int = 0) -> np.ndarray:
    """q (T, n_head*hd), k/v (T, n_kv*hd) of a ubatch described by batch (core.paged_kv.SeqBatch);
    store: the layer's HostKV (slots x n_kv x hd). Writes the new K/V, returns (T, n_head*hd).
    Every row through the same per-row kernel, whatever the ubatch holds (prompt chunks too): a
    token's output depends only on its own sequence."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    k, v = _f32_rows(k), _f32_rows(v)
    pos = np.asarray(positions, dtype=np.int64)
    out = np.empty_like(q)
    fn = paged_parallel if q.shape[0] * n_head >= PAGED_PAR_MIN else paged_serial
    fn(q, k, v, store.k, store.v, batch.slots, batch.seq, pos, batch.tables, batch.block_size, n_head, n_kv, hd,
       np.float32(scale), int(window or 0), out)
    return out
