"""Float32 elementwise / normalization kernels used per op by the CPU executor.

All take x as (n_tok, n) float32 C-contiguous (1-D is accepted and treated as one row).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

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


@njit(**_JIT)
def _swiglu(g, u, out):
    a = g.reshape(-1)
    b = u.reshape(-1)
    o = out.reshape(-1)
    n = a.size
    chunk = 4096
    for c in prange((n + chunk - 1) // chunk):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            v = a[i]
            o[i] = v / (np.float32(1.0) + np.exp(-v)) * b[i]


@njit(**_JIT)
def _gelu_tanh(x, out):
    a = x.reshape(-1)
    o = out.reshape(-1)
    n = a.size
    k0 = np.float32(math.sqrt(2.0 / math.pi))
    k1 = np.float32(0.044715)
    chunk = 4096
    for c in prange((n + chunk - 1) // chunk):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            v = a[i]
            o[i] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(k0 * (v + k1 * v * v * v)))


def _as2d(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])


def rms_norm(x, w, eps, out=None):
    """out = x / sqrt(mean(x^2) + eps) * w, row-wise."""
    shape = np.shape(x)
    x2 = _as2d(x)
    w = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    o = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    _rms_norm(x2, w, np.float32(eps), o)
    return o.reshape(shape) if out is None else out


def swiglu(gate, up, out=None):
    """silu(gate) * up."""
    g = np.ascontiguousarray(gate, dtype=np.float32)
    u = np.ascontiguousarray(up, dtype=np.float32)
    o = np.empty_like(g) if out is None else out
    _swiglu(g, u, o)
    return o


def gelu_tanh(x, out=None):
    """0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    o = np.empty_like(x) if out is None else out
    _gelu_tanh(x, o)
    return o
