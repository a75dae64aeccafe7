"""Causal grouped-query attention over the float32 KV cache: per query row for decode (attention_decode
writes the cache too, one call; also inside the compiled programs) and small batches; per (head, block
of queries) through sgemm + vectorized softmax for prefill (from ATT_SGEMM_MIN_TOK query rows)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import blas
from .blas import sgemm
from .jit import PAR, SER as _SER
from .llvm_ir import HAVE_AVX2
from .ops import PAR_MIN
from .vmath import vexp

_JIT = PAR
ATT_PAR_MIN = 4 * PAR_MIN  # query rows x heads from which the row kernels use the thread pool
# From this many query rows attention runs as per-(head, 64-query block) sgemm + vectorized softmax
# (attention_sgemm); below, the per-row kernels (decode).
ATT_SGEMM_MIN_TOK = 16
ATT_BQ = 64  # queries per attention_sgemm work item


@njit(**_SER)
def _attn_row(q, kc, vc, n_past, g, hd, scale, window, t, h, sc, acc, out):
    """One query row t of head h over cache rows [lo, n_past + t]: softmax(q.k * scale) @ v.
    Everything float32 (a float64 constant here would turn the loops scalar)."""
    kh = h // g
    pos = n_past + t
    lo = 0
    if window > 0:
        lo = max(0, pos - window + 1)
    qv = q[t, h * hd:(h + 1) * hd]
    mx = np.float32(-3.0e38)
    s = lo
    while s + 3 <= pos:  # 4 keys at a time: 4 independent reductions (latency-bound otherwise)
        k0 = kc[s, kh]
        k1 = kc[s + 1, kh]
        k2 = kc[s + 2, kh]
        k3 = kc[s + 3, kh]
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
        kv = kc[s, kh]
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
    vexp(sc, 0, n)  # vectorized (np.exp here is a scalar libm call per key)
    tot = np.float32(0.0)
    for s in range(n):
        tot += sc[s]
    inv = np.float32(1.0) / tot
    for d in range(hd):
        acc[d] = np.float32(0.0)
    for s in range(lo, pos + 1):
        p = sc[s - lo] * inv
        vv = vc[s, kh]
        for d in range(hd):
            acc[d] += p * vv[d]
    o = out[t, h * hd:(h + 1) * hd]
    for d in range(hd):
        o[d] = acc[d]


@njit(**_JIT)
def attention_parallel(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    n_tok = q.shape[0]
    g = n_head // n_kv
    s_max = n_past + n_tok
    for i in prange(n_tok * n_head):  # head-major: each thread gets whole heads (causal work balanced)
        h = i // n_tok
        t = i % n_tok
        sc = np.empty(s_max, np.float32)
        acc = np.empty(hd, np.float32)
        _attn_row(q, kc, vc, n_past, g, hd, scale, window, t, h, sc, acc, out)


@njit(**_SER)
def attention_serial(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    n_tok = q.shape[0]
    g = n_head // n_kv
    sc = np.empty(n_past + n_tok, np.float32)
    acc = np.empty(hd, np.float32)
    for t in range(n_tok):
        for h in range(n_head):
            _attn_row(q, kc, vc, n_past, g, hd, scale, window, t, h, sc, acc, out)


@njit(**_SER)
def attention_decode(q, k_new, v_new, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    """Decode: write k_new/v_new (n_tok, n_kv*hd; row-strided views allowed) into the caches at
    n_past, then the serial per-row attention (one call instead of two cache writes + attention)."""
    n_tok = q.shape[0]
    for t in range(n_tok):
        for kh in range(n_kv):
            for d in range(hd):
                kc[n_past + t, kh, d] = k_new[t, kh * hd + d]
                vc[n_past + t, kh, d] = v_new[t, kh * hd + d]
    attention_serial(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out)


@njit(**_SER)
def _softmax_rows(sc, t0, t1, n_past, lo, window):
    """Row r = t - t0 of sc holds the scores of query t over keys [lo, lo + sc.shape[1]); keep its causal
    (and windowed) range, softmax it, zero the rest."""
    L = sc.shape[1]
    for t in range(t0, t1):
        row = sc[t - t0]
        pos = n_past + t
        a = 0
        if window > 0:
            a = max(lo, pos - window + 1) - lo
        b = pos - lo + 1
        mx = np.float32(-3.0e38)
        for j in range(a, b):
            mx = max(mx, row[j])
        for j in range(a, b):
            row[j] -= mx
        vexp(row, a, b - a)
        tot = np.float32(0.0)
        for j in range(a, b):
            tot += row[j]
        inv = np.float32(1.0) / tot
        for j in range(a, b):
            row[j] *= inv
        for j in range(0, a):
            row[j] = np.float32(0.0)
        for j in range(b, L):
            row[j] = np.float32(0.0)


@njit(**_JIT)
def attention_sgemm(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    """Prefill attention per (head, block of ATT_BQ queries): S = scale * Q K^T over the block's key
    range (sgemm), masked softmax (vectorized exp), O = P V (sgemm).  q/out (T, n_head*hd), kc/vc
    (n_ctx, n_kv, hd), all float32 C-contiguous."""
    n_tok = q.shape[0]
    g = n_head // n_kv
    n_qb = (n_tok + ATT_BQ - 1) // ATT_BQ
    qp = q.ctypes.data
    kp = kc.ctypes.data
    vp = vc.ctypes.data
    op = out.ctypes.data
    ldq = n_head * hd
    ldk = n_kv * hd
    for it in prange(n_head * n_qb):
        h = it // n_qb
        qb = it % n_qb
        kh = h // g
        t0 = qb * ATT_BQ
        t1 = min(n_tok, t0 + ATT_BQ)
        lo = 0
        if window > 0:
            lo = max(0, n_past + t0 - window + 1)
        hi = n_past + t1
        sc = np.empty((t1 - t0, hi - lo), np.float32)
        sgemm(True, t1 - t0, hi - lo, hd, scale, qp + 4 * (t0 * ldq + h * hd), ldq,
              kp + 4 * (lo * ldk + kh * hd), ldk, sc.ctypes.data, hi - lo)
        _softmax_rows(sc, t0, t1, n_past, lo, window)
        sgemm(False, t1 - t0, hd, hi - lo, np.float32(1.0), sc.ctypes.data, hi - lo,
              vp + 4 * (lo * ldk + kh * hd), ldk, op + 4 * (t0 * ldq + h * hd), ldq)


def attention(q, k_cache, v_cache, n_past, n_head, n_kv, head_dim, scale, window=0, use_blas=None):
    """Causal grouped-query attention of q (n_tok, n_head*head_dim) over cache rows [0, n_past+n_tok)
    of k_cache/v_cache (n_ctx, n_kv, head_dim); window > 0: only the last `window` positions.
    use_blas: sgemm for prefill (None: when numba's threads can call OpenBLAS)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty_like(q)
    args = (q, k_cache, v_cache, int(n_past), int(n_head), int(n_kv), int(head_dim), np.float32(scale),
            int(window or 0), out)
    if use_blas is None:
        use_blas = HAVE_AVX2 and blas.AVAILABLE
    if q.shape[0] >= ATT_SGEMM_MIN_TOK and use_blas \
            and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous \
            and k_cache.dtype == v_cache.dtype == np.float32:
        with blas.one_blas_thread():
            attention_sgemm(*args)
    else:
        (attention_parallel if q.shape[0] * n_head >= ATT_PAR_MIN else attention_serial)(*args)
    return out
