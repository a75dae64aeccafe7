"""Prefill attention (from ATT_SGEMM_MIN_TOK query rows): per (head, block of queries) through
sgemm + a vectorized masked softmax; attention.py chooses it."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blas import sgemm
from .jit import PAR as _JIT
from .jit import SER as _SER
from .vmath import vexp

# From this many query rows attention runs as per-(head, 64-query block) sgemm + vectorized softmax
# (attention_sgemm); below, attention.attention_dec.
ATT_SGEMM_MIN_TOK = 16
ATT_BQ = 64  # queries per attention_sgemm work item


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
