"""CPU prefill paths built on sgemm from numba's threads (blas, matmul_blas, attention) and the vectorized exp (vmath)."""
from __future__ import annotations

import numpy as np
import pytest

from lstream.backends.cpu import attention, dequant, ops, weights
from lstream.backends.cpu.matmul import matmul
from lstream.backends.cpu.vmath import vexp

blas = pytest.importorskip("lstream.backends.cpu.blas")
need_blas = pytest.mark.skipif(not blas.AVAILABLE, reason="numpy carries no ILP64 OpenBLAS")


def test_vexp_accuracy():
    x = np.linspace(-90, 90, 100_003).astype(np.float32)  # odd length: the scalar tail too
    a = x.copy()
    vexp(a, 0, a.size)
    ref = np.exp(np.clip(x.astype(np.float64), -80, 80))
    keep = x >= -64  # below, exp is exactly 0 (no denormal softmax weights)
    assert np.max(np.abs(a[keep] - ref[keep]) / ref[keep]) < 4e-7  # ~3 ulp
    assert (a[~keep] == 0).all()
    b = x.copy()
    vexp(b, 5, 11)  # a window: the rest untouched
    np.testing.assert_array_equal(b[:5], x[:5])
    np.testing.assert_array_equal(b[16:], x[16:])


def test_geglu_strided():
    rng = np.random.default_rng(3)
    gu = (rng.standard_normal((40, 2 * 300)) * 4).astype(np.float32)
    g, u = gu[:, :300], gu[:, 300:]  # column slices of one stacked output
    g64 = g.astype(np.float64)
    ref = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3))) * u
    np.testing.assert_allclose(ops.geglu(g, u), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ops.geglu(g[:3], u[:3]), ref[:3], rtol=1e-4, atol=1e-5)  # serial variant


@need_blas
@pytest.mark.parametrize("n_head,n_kv,hd,n_tok,n_past,window", [
    (9, 3, 64, 150, 0, 0), (4, 1, 256, 70, 0, 0), (4, 1, 256, 130, 0, 50), (6, 2, 32, 40, 33, 0),
    (6, 2, 32, 100, 20, 64)])
def test_attention_sgemm_matches_row_kernel(n_head, n_kv, hd, n_tok, n_past, window):
    rng = np.random.default_rng(n_tok)
    s = n_past + n_tok
    q = rng.standard_normal((n_tok, n_head * hd), dtype=np.float32)
    kc = rng.standard_normal((s + 7, n_kv, hd), dtype=np.float32)
    vc = rng.standard_normal((s + 7, n_kv, hd), dtype=np.float32)
    args = (q, kc, vc, n_past, n_head, n_kv, hd, np.float32(hd ** -0.5), window)
    ref = np.empty_like(q)
    attention.attention_serial(*args, ref)
    got = np.empty_like(q)
    with blas.one_blas_thread():
        attention.attention_sgemm(*args, got)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(attention.attention(*args), ref, rtol=0, atol=2e-5)


@need_blas
@pytest.mark.parametrize("n_tok", [32, 100])
def test_blas_matmul_path_leaves_openblas_threads(n_tok):
    """The prefill sgemm path sets OpenBLAS to one thread only for the call."""
    n0 = blas.openblas_threads()
    from tests.test_cpu_kernels import make_raw  # noqa: E402
    from lstream.core.qtypes import QType
    raw = make_raw(QType.Q4_K, 40, 512, seed=1)
    w = weights.pack(QType.Q4_K, raw, 40, 512)
    x = np.random.default_rng(0).standard_normal((n_tok, 512)).astype(np.float32)
    y = matmul(w, x)
    ref = x.astype(np.float64) @ dequant.dequantize(QType.Q4_K, raw, 512).astype(np.float64).T
    assert float(np.sum((y - ref) ** 2) / np.sum(ref ** 2)) < 1e-10
    assert blas.openblas_threads() == n0


@need_blas
def test_blas_tile_chosen_once_and_same_result():
    """The prefill path times its tile candidates at a shape's first use and keeps the fastest:
    later calls give the first call's output exactly; every tile agrees to fp32 rounding."""
    from tests.test_cpu_kernels import make_raw  # noqa: E402
    from lstream.backends.cpu import matmul as mm
    from lstream.core.qtypes import QType
    n_rows, n_cols = 700, 576
    raw = make_raw(QType.Q4_1, n_rows, n_cols, seed=2)
    w = weights.pack(QType.Q4_1, raw, n_rows, n_cols)
    x = np.random.default_rng(1).standard_normal((48, n_cols)).astype(np.float32)
    key = ("nibw", QType.Q4_1, n_rows, n_cols, 64)
    mm._BLAS_TILE.pop(key, None)
    first = matmul(w, x)
    chosen = mm._BLAS_TILE[key]
    assert chosen in {max(16, min(256, e // n_cols)) for e in mm._BLAS_TILE_CANDIDATES}
    np.testing.assert_array_equal(matmul(w, x), first)
    for rows in {max(16, min(256, e // n_cols)) for e in mm._BLAS_TILE_CANDIDATES}:
        mm._BLAS_TILE[key] = rows
        np.testing.assert_allclose(matmul(w, x), first, rtol=0, atol=1e-4 * float(np.abs(first).max()))
    ref = x.astype(np.float64) @ dequant.dequantize(QType.Q4_1, raw, n_cols).astype(np.float64).T
    assert float(np.sum((first - ref) ** 2) / np.sum(ref ** 2)) < 1e-10
