"""Float32 elementwise / normalization kernels used per op by the CPU executor.

All take x as (n_tok, n) float32 C-contiguous (1-D is accepted and treated as one row).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .vmath import GELU_K0, GELU_K1, vexp

try:
    from . import matmul_blas as _blas
except Exception:  # pragma: no cover (no AVX2 / no OpenBLAS: the per-row kernels do all of it)
    _blas = None

_JIT = dict(cache=True, nogil=True, fastmath=True, parallel=True, boundscheck=False)


@njit(**_JIT)
def _rms_norm(x, w, eps, out):
    n_tok, n = x.shape
    for t in prange(n_tok):
        ss = np.float32(0.0)
        for i in range(n):
            v = x[t, i]
            ss += v * v
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


_SER = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)
_PAR_MIN = 8  # rows (tokens) from which the row-wise kernels use the thread pool
_ATT_PAR_MIN = 4 * _PAR_MIN  # query rows x heads from which attention uses the thread pool


@njit(**_SER)
def _rms_norm_1(x, w, eps, out):
    n_tok, n = x.shape
    for t in range(n_tok):
        ss = np.float32(0.0)
        for i in range(n):
            v = x[t, i]
            ss += v * v
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


# silu / gelu through the vectorized exp (cpu_vmath): np.exp in these loops is a scalar libm call
# per element (Gemma 3's GEGLU took 11.6 ms per 512x2048 call; SmolLM2's SWIGLU 1.8 ms per 512x1536).
# gelu_tanh(v) = 0.5 v (1 + tanh(z)) = v * sigmoid(2z) = v / (1 + exp(-2z)), z = k0 (v + k1 v^3).
ACT_SILU, ACT_GELU = 0, 1


@njit(**_SER)
def _act_row(kind, g, u, has_u, out, t, tmp):
    n = g.shape[1]
    if kind == ACT_SILU:
        for i in range(n):
            tmp[i] = -g[t, i]
    else:
        c0 = np.float32(-2.0) * GELU_K0
        for i in range(n):
            v = g[t, i]
            tmp[i] = c0 * (v + GELU_K1 * v * v * v)
    vexp(tmp, 0, n)
    if has_u:
        for i in range(n):
            out[t, i] = g[t, i] / (np.float32(1.0) + tmp[i]) * u[t, i]
    else:
        for i in range(n):
            out[t, i] = g[t, i] / (np.float32(1.0) + tmp[i])


@njit(**_JIT)
def _act(kind, g, u, has_u, out):
    """Row-wise on 2-D (row-strided) arrays: gate/up may be column slices of one stacked output."""
    n_tok, n = g.shape
    n_ch = (n_tok + 7) // 8
    for c in prange(n_ch):
        tmp = np.empty(n, np.float32)
        for t in range(c * 8, min(n_tok, c * 8 + 8)):
            _act_row(kind, g, u, has_u, out, t, tmp)


@njit(**_SER)
def _act_1(kind, g, u, has_u, out):
    tmp = np.empty(g.shape[1], np.float32)
    for t in range(g.shape[0]):
        _act_row(kind, g, u, has_u, out, t, tmp)


@njit(**_SER)
def _rope_row(x, t, cos, sin, n_rot, neox):
    n_head = x.shape[1]
    half = n_rot // 2
    for h in range(n_head):
        if neox:
            for i in range(half):
                a = x[t, h, i]
                b = x[t, h, i + half]
                c = cos[t, i]
                s = sin[t, i]
                x[t, h, i] = a * c - b * s
                x[t, h, i + half] = a * s + b * c
        else:
            for i in range(half):
                a = x[t, h, 2 * i]
                b = x[t, h, 2 * i + 1]
                c = cos[t, i]
                s = sin[t, i]
                x[t, h, 2 * i] = a * c - b * s
                x[t, h, 2 * i + 1] = a * s + b * c


@njit(**_JIT)
def _rope(x, cos, sin, n_rot, neox):
    for t in prange(x.shape[0]):
        _rope_row(x, t, cos, sin, n_rot, neox)


@njit(**_SER)
def _rope_1(x, cos, sin, n_rot, neox):
    for t in range(x.shape[0]):
        _rope_row(x, t, cos, sin, n_rot, neox)


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
def _attention(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
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
def _attention_1(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    n_tok = q.shape[0]
    g = n_head // n_kv
    sc = np.empty(n_past + n_tok, np.float32)
    acc = np.empty(hd, np.float32)
    for t in range(n_tok):
        for h in range(n_head):
            _attn_row(q, kc, vc, n_past, g, hd, scale, window, t, h, sc, acc, out)


@njit(**_SER)
def _attention_dec(q, k_new, v_new, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    """Decode: write k_new/v_new (n_tok, n_kv*hd; row-strided views allowed) into the caches at
    n_past, then the serial per-row attention (one call instead of two cache writes + attention)."""
    n_tok = q.shape[0]
    for t in range(n_tok):
        for kh in range(n_kv):
            for d in range(hd):
                kc[n_past + t, kh, d] = k_new[t, kh * hd + d]
                vc[n_past + t, kh, d] = v_new[t, kh * hd + d]
    _attention_1(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out)


@njit(**_SER)
def _rope_out_rows(x, out, cos, sin, n_rot, neox, t0, t1):
    """out[t] = rope(x[t]) for t in [t0, t1); x (n_tok, n_head*hd) may be row-strided, out (n_tok, n_head, hd)."""
    n_head, hd = out.shape[1], out.shape[2]
    half = n_rot // 2
    for t in range(t0, t1):
        for h in range(n_head):
            b = h * hd
            if neox:
                for i in range(half):
                    a_ = x[t, b + i]
                    b_ = x[t, b + i + half]
                    c = cos[t, i]
                    s = sin[t, i]
                    out[t, h, i] = a_ * c - b_ * s
                    out[t, h, i + half] = a_ * s + b_ * c
            else:
                for i in range(half):
                    a_ = x[t, b + 2 * i]
                    b_ = x[t, b + 2 * i + 1]
                    c = cos[t, i]
                    s = sin[t, i]
                    out[t, h, 2 * i] = a_ * c - b_ * s
                    out[t, h, 2 * i + 1] = a_ * s + b_ * c
            for i in range(n_rot, hd):
                out[t, h, i] = x[t, b + i]


@njit(**_SER)
def _rope_out_1(x, out, cos, sin, n_rot, neox):
    _rope_out_rows(x, out, cos, sin, n_rot, neox, 0, x.shape[0])


def rope(x, cos, sin, n_head, head_dim, n_rot, neox):
    """Out-of-place rope: x (n_tok, n_head*head_dim) float32 with unit inner stride (a column slice of
    a stacked q|k|v output passes without a copy) -> (n_tok, n_head, head_dim); cos/sin (n_tok, n_rot/2)
    float32 C-contiguous."""
    x = _rows(x)
    out = np.empty((x.shape[0], n_head, head_dim), np.float32)
    # one thread even for prefill: ~0.1 ms per layer at 512 tokens, and one kernel fewer to compile
    # (a parallel variant cost ~2 s on a cold start); decode programs call the same one
    _rope_out_1(x, out, cos, sin, n_rot, neox)
    return out


def _as2d(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])


def rms_norm(x, w, eps, out=None):
    """out = x / sqrt(mean(x^2) + eps) * w, row-wise."""
    shape = np.shape(x)
    x2 = _as2d(x)
    w = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    o = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    (_rms_norm if x2.shape[0] >= _PAR_MIN else _rms_norm_1)(x2, w, np.float32(eps), o)
    return o.reshape(shape) if out is None else out


def _rows(a):
    """2-D float32 view with unit inner stride (row-strided slices pass without a copy)."""
    if not (a.dtype == np.float32 and a.ndim == 2 and a.strides[1] == 4):
        a = _as2d(a)
    return a


def _activation(kind, gate, up, out):
    shape = np.shape(gate)
    g = _rows(gate)
    u = _rows(up) if up is not None else g
    o = np.empty(g.shape, np.float32) if out is None else out.reshape(g.shape)
    (_act if g.shape[0] >= _PAR_MIN else _act_1)(kind, g, u, up is not None, o)
    return o.reshape(shape) if out is None else out


def swiglu(gate, up, out=None):
    """silu(gate) * up.  2-D float32 inputs may be row-strided views (no copy)."""
    return _activation(ACT_SILU, gate, up, out)


def geglu(gate, up, out=None):
    """gelu_tanh(gate) * up.  2-D float32 inputs may be row-strided views (no copy)."""
    return _activation(ACT_GELU, gate, up, out)


def gelu_tanh(x, out=None):
    """0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))."""
    return _activation(ACT_GELU, x, None, out)


def rope_inplace(x, cos, sin, n_rot, neox):
    """x (n_tok, n_head, head_dim) float32 C-contiguous, rotated in place; cos/sin (n_tok, n_rot/2)."""
    cos = np.ascontiguousarray(cos, dtype=np.float32)
    sin = np.ascontiguousarray(sin, dtype=np.float32)
    (_rope if x.shape[0] >= _PAR_MIN else _rope_1)(x, cos, sin, int(n_rot), bool(neox))


def attention(q, k_cache, v_cache, n_past, n_head, n_kv, head_dim, scale, window=0):
    """Causal grouped-query attention of q (n_tok, n_head*head_dim) over cache rows [0, n_past+n_tok)
    of k_cache/v_cache (n_ctx, n_kv, head_dim); window > 0: only the last `window` positions."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty_like(q)
    args = (q, k_cache, v_cache, int(n_past), int(n_head), int(n_kv), int(head_dim), np.float32(scale),
            int(window or 0), out)
    if q.shape[0] >= _ATT_SGEMM_MIN_TOK and _blas is not None and _blas.AVAILABLE \
            and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous \
            and k_cache.dtype == v_cache.dtype == np.float32:
        with _blas.one_blas_thread():
            _blas.attention_sgemm(*args)
    else:
        (_attention if q.shape[0] * n_head >= _ATT_PAR_MIN else _attention_1)(*args)
    return out


# From this many query rows attention runs as per-(head, 64-query block) sgemm + vectorized softmax
# (cpu_blas.attention_sgemm); below, the per-row kernels above (decode).
_ATT_SGEMM_MIN_TOK = 16
