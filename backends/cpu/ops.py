"""Float32 row-wise ops: rms_norm, silu/gelu gates (SWIGLU, GEGLU), rope, every step (op by op and
inside the compiled decode programs); a parallel kernel from PAR_MIN rows, a serial one below."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .jit import EXACT, PAR, SER as _SER
from .vmath import GELU_K0, GELU_K1, vexp

_JIT = PAR


@njit(**EXACT)
def _rms_row(x, w, eps, out, t):
    """One row, in one fixed order: 8 partial sums, then pairwise. Without fast-math flags no caller
    can vectorize it otherwise (the serial, parallel and program kernels did, 3e-8 apart: enough to
    move a token of a batch, and int8 activations round such differences up to whole steps)."""
    n = x.shape[1]
    z = np.float32(0.0)
    a0, a1, a2, a3, a4, a5, a6, a7 = z, z, z, z, z, z, z, z  # locals: registers, not a heap array
    n8 = n - n % 8
    for i in range(0, n8, 8):
        a0 += x[t, i] * x[t, i]
        a1 += x[t, i + 1] * x[t, i + 1]
        a2 += x[t, i + 2] * x[t, i + 2]
        a3 += x[t, i + 3] * x[t, i + 3]
        a4 += x[t, i + 4] * x[t, i + 4]
        a5 += x[t, i + 5] * x[t, i + 5]
        a6 += x[t, i + 6] * x[t, i + 6]
        a7 += x[t, i + 7] * x[t, i + 7]
    for i in range(n8, n):
        a0 += x[t, i] * x[t, i]
    ss = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
    for i in range(n):
        out[t, i] = x[t, i] * inv * w[i]


@njit(**_JIT)
def rms_norm_parallel(x, w, eps, out):
    for t in prange(x.shape[0]):
        _rms_row(x, w, eps, out, t)


PAR_MIN = 8  # rows (tokens) from which the row-wise kernels use the thread pool


@njit(**_SER)
def rms_norm_serial(x, w, eps, out):
    for t in range(x.shape[0]):
        _rms_row(x, w, eps, out, t)


# silu / gelu through the vectorized exp (vmath.py): np.exp in these loops is a scalar libm call
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
def act_parallel(kind, g, u, has_u, out):
    """Row-wise on 2-D (row-strided) arrays: gate/up may be column slices of one stacked output."""
    n_tok, n = g.shape
    n_ch = (n_tok + 7) // 8
    for c in prange(n_ch):
        tmp = np.empty(n, np.float32)
        for t in range(c * 8, min(n_tok, c * 8 + 8)):
            _act_row(kind, g, u, has_u, out, t, tmp)


@njit(**_SER)
def act_serial(kind, g, u, has_u, out):
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
def rope_parallel(x, cos, sin, n_rot, neox):
    for t in prange(x.shape[0]):
        _rope_row(x, t, cos, sin, n_rot, neox)


@njit(**_SER)
def rope_serial(x, cos, sin, n_rot, neox):
    for t in range(x.shape[0]):
        _rope_row(x, t, cos, sin, n_rot, neox)


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
def rope_out_serial(x, out, cos, sin, n_rot, neox):
    _rope_out_rows(x, out, cos, sin, n_rot, neox, 0, x.shape[0])


def rope(x, cos, sin, n_head, head_dim, n_rot, neox):
    """Out-of-place rope: x (n_tok, n_head*head_dim) float32 with unit inner stride (a column slice of
    a stacked q|k|v output passes without a copy) -> (n_tok, n_head, head_dim); cos/sin (n_tok, n_rot/2)
    float32 C-contiguous."""
    x = _rows(x)
    out = np.empty((x.shape[0], n_head, head_dim), np.float32)
    # one thread even for prefill: ~0.1 ms per layer at 512 tokens, and one kernel fewer to compile
    # (a parallel variant cost ~2 s on a cold start); decode programs call the same one
    rope_out_serial(x, out, cos, sin, n_rot, neox)
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
    (rms_norm_parallel if x2.shape[0] >= PAR_MIN else rms_norm_serial)(x2, w, np.float32(eps), o)
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
    (act_parallel if g.shape[0] >= PAR_MIN else act_serial)(kind, g, u, up is not None, o)
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
    (rope_parallel if x.shape[0] >= PAR_MIN else rope_serial)(x, cos, sin, int(n_rot), bool(neox))
