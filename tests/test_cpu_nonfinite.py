"""Every CPU kernel computes through NaN, inf and huge (1e30) inputs without raising (numba's default
error model raises ZeroDivisionError from inside a kernel, e.g. a softmax whose scores are all -inf),
and a NaN/inf in an input shows as a non-finite output (not optimized into finite garbage), so the
engine's non-finite check can report it."""
from __future__ import annotations

import numpy as np
import pytest

from lstream.backends.cpu import attention, matmul_int, ops, program_kernels, weights
from lstream.backends.cpu.llvm_ir import HAVE_AVX2
from lstream.backends.cpu.matmul import NEVER, matmul
from lstream.backends.cpu.vmath import vexp
from lstream.core.qtypes import QType

from test_cpu_kernels import make_raw

BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 1e30, "-huge": -1e30}
NONFINITE = ("nan", "inf", "-inf")


def _x(rows, cols, kind, seed=0, where=((0, 3),)):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    for r, c in where:
        x[r % rows, c % cols] = BAD[kind]
    return x


def _quiet(f, *a, **k):
    with np.errstate(all="ignore"):  # numpy's own arithmetic in the references and wrappers
        return f(*a, **k)


@pytest.mark.parametrize("kind", BAD)
def test_vexp(kind):
    a = np.full(21, BAD[kind], np.float32)  # 16 lanes and a scalar tail
    vexp(a, 0, a.size)
    if kind == "nan":
        assert np.isnan(a).all()
    else:
        assert np.isfinite(a).all() or kind in ("inf", "-inf")


@pytest.mark.parametrize("rows", [1, 3, ops.PAR_MIN + 1])  # serial and parallel kernels
@pytest.mark.parametrize("kind", BAD)
def test_rows_ops(kind, rows):
    x = _x(rows, 96, kind)
    w = np.ones(96, np.float32)
    y = ops.rms_norm(x, w, 1e-6)
    g, u = _x(rows, 96, kind, 1), _x(rows, 96, "huge", 2)
    a = [ops.swiglu(g, u), ops.geglu(g, u), ops.gelu_tanh(g)]
    hn = np.empty_like(x)
    program_kernels._norm_heads(x, w[:32], 32, np.float32(1e-6), hn)
    ang = np.linspace(0, 3, rows * 16, dtype=np.float32).reshape(rows, 16)
    cos, sin = np.cos(ang), np.sin(ang)
    r1 = ops.rope(x, cos, sin, 3, 32, 32, True)
    r2 = x.reshape(rows, 3, 32).copy()
    ops.rope_inplace(r2, cos, sin, 32, False)
    if kind in NONFINITE:  # the bad row stays visibly bad
        for v in [y, hn, r1, r2] + a:
            assert not np.isfinite(v.reshape(rows, -1)[0]).all()


def _attn_inputs(kind, n_tok, n_past, n_head=6, n_kv=2, hd=32, where="q"):
    rng = np.random.default_rng(n_tok + n_past)
    s = n_past + n_tok
    q = rng.standard_normal((n_tok, n_head * hd)).astype(np.float32)
    kc = rng.standard_normal((s + 3, n_kv, hd)).astype(np.float32)
    vc = rng.standard_normal((s + 3, n_kv, hd)).astype(np.float32)
    {"q": q, "k": kc, "v": vc}[where].reshape(-1)[5] = BAD[kind]
    if where == "q" and kind in ("inf", "-inf", "huge", "-huge"):
        q[:] = BAD[kind]  # every score +-inf: the softmax sum may be 0 (a 1/0 in the kernel)
    return q, kc, vc, n_head, n_kv, hd


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("n_tok,n_past", [(1, 7), (1, 600), (5, 30), (40, 10)])
def test_attention(kind, where, n_tok, n_past):
    """Decode (one pass and split), small batches (row kernels) and prefill (sgemm)."""
    q, kc, vc, n_head, n_kv, hd = _attn_inputs(kind, n_tok, n_past, where=where)
    sc = np.float32(hd ** -0.5)
    outs = []
    for use_blas in (False, True):
        outs.append(attention.attention(q, kc, vc, n_past, n_head, n_kv, hd, sc, 0, use_blas=use_blas))
    if n_tok == 1:
        kn = kc[n_past:n_past + 1].reshape(1, -1).copy()
        vn = vc[n_past:n_past + 1].reshape(1, -1).copy()
        out = np.empty_like(q)
        attention.attention_decode(q, kn, vn, kc, vc, n_past, n_head, n_kv, hd, sc, 0, out)
        outs.append(out)
        out = np.empty_like(q)
        attention.attention_split(q, kc, vc, n_past, n_head, n_kv, hd, sc, 0, out, 16)
        outs.append(out)
        out = np.empty_like(q)
        attention.attention_onepass(q, kc, vc, n_past, n_head, n_kv, hd, sc, 0, out)
        outs.append(out)
    if kind in NONFINITE and where != "k" or kind == "nan":
        for o in outs:
            assert not np.isfinite(o).all()


QTYPES = [QType.Q4_1, QType.Q8_0, QType.Q4_K, QType.Q5_0, QType.Q6_K, QType.F32]


@pytest.mark.skipif(not HAVE_AVX2, reason="the quantized kernels need AVX2")
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("n_tok,gemm_min", [(1, None), (3, None), (12, None), (12, NEVER), (40, None)])
def test_matmul(qtype, kind, n_tok, gemm_min):
    """Decode (mm_dec, the decode fast path), int16 batches (quant_x + mm_int) and prefill (sgemm)."""
    n_rows, n_cols = 48, 256
    w = weights.pack(qtype, make_raw(qtype, n_rows, n_cols), n_rows, n_cols)
    x = _x(n_tok, n_cols, kind)
    y = _quiet(matmul, w, x, None, True, gemm_min)
    assert y.shape == (n_tok, n_rows)
    if kind in NONFINITE:
        assert not np.isfinite(y[0]).any()  # every output of the bad token: no finite garbage
        assert np.isfinite(y[1:]).all()


@pytest.mark.parametrize("kind", BAD)
def test_quant_row_marks_bad_blocks(kind):
    x = _x(1, 96, kind, where=((0, 40),))
    xq = np.empty((1, 96), np.int16)
    xd = np.empty((1, 3), np.float32)
    xs = np.empty((1, 3), np.float32)
    matmul_int.quant_row(x, xq, xd, xs, 0)
    assert np.isfinite(xd[0, [0, 2]]).all() and np.isfinite(xs[0, [0, 2]]).all()
    assert np.isfinite(xd[0, 1]) == (kind not in NONFINITE)
