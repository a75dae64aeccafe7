"""The nibble layouts with fp16 scales (Q4_0, Q4_1 as "nibw", Q5_0, Q5_1 as "nib5h", nib_half.py):
the file's scales kept exactly, 18/20/22/24 bytes per 32 weights, and every kernel that reads them
(1-token and 4-token dots, prefill's dequantized tiles with and without BLAS, the decode driver)
against gguf-py's dequantization and against the same values through the float32-scale kernels."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from lstream.backends.cpu import matmul as mm
from lstream.backends.cpu import matmul_int, weights
from lstream.backends.cpu.llvm_ir import HAVE_AVX2
from lstream.core.qtypes import QType
from tests.test_cpu_kernels import make_raw

pytestmark = pytest.mark.skipif(not HAVE_AVX2, reason="the repacked layouts need AVX2")
HALF = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]
BYTES = {QType.Q4_0: 18, QType.Q4_1: 20, QType.Q5_0: 22, QType.Q5_1: 24}  # per 32 weights


def _f32_twin(w: weights.PackedWeight) -> weights.PackedWeight:
    """The same weight in the float32-scale layouts of Q4_K / Q5_K ("nib": GGUF nibble order)."""
    d, m = w.scales_f32()
    if w.layout == "nib5h":
        return weights.PackedWeight(w.qtype, w.raw, w.n_rows, w.n_cols, "nib5", w.qs, d, m, w.qh)
    blocks = w.raw.reshape(w.n_rows * w.n_cols // 32, -1)
    qs = np.ascontiguousarray(blocks[:, -16:]).reshape(-1)  # the file's nibbles
    return weights.PackedWeight(w.qtype, w.raw, w.n_rows, w.n_cols, "nib", qs, d, m)


def test_word_order():
    """Word k of a "nibw" block holds values k, k+8, k+16, k+24 in its nibbles, low to high."""
    v = np.random.default_rng(0).integers(0, 16, (5, 32)).astype(np.uint8)
    gguf = v[:, :16] | (v[:, 16:] << 4)
    words = weights.word_order(gguf).view(np.uint16).astype(np.int64)
    for k in range(8):
        for s in range(4):
            np.testing.assert_array_equal((words[:, k] >> (4 * s)) & 15, v[:, k + 8 * s])


def _ref(raw, qtype, n_rows, n_cols, x):
    wf = gq.dequantize(raw, G(int(qtype))).reshape(n_rows, n_cols).astype(np.float64)
    return x.astype(np.float64) @ wf.T


def _nmse(y, ref):
    return float(np.sum((y.astype(np.float64) - ref) ** 2) / np.sum(ref ** 2))


@pytest.mark.parametrize("qtype", HALF, ids=lambda q: q.name)
def test_scales_are_the_files_fp16(qtype):
    n_rows, n_cols = 9, 576
    raw = make_raw(qtype, n_rows, n_cols, seed=3)
    w = weights.pack(qtype, raw, n_rows, n_cols)
    assert w.layout == ("nibw" if qtype in (QType.Q4_0, QType.Q4_1) else "nib5h")
    assert w.d.dtype == np.float16 and (w.m is None) == (qtype in (QType.Q4_0, QType.Q5_0))
    assert w.nbytes == n_rows * n_cols // 32 * BYTES[qtype]
    blocks = raw.reshape(-1, raw.shape[1] // (n_cols // 32))
    np.testing.assert_array_equal(w.d.view(np.uint16), blocks[:, 0:2].copy().view(np.uint16).reshape(-1))
    if w.m is not None:
        np.testing.assert_array_equal(w.m.view(np.uint16), blocks[:, 2:4].copy().view(np.uint16).reshape(-1))


@pytest.mark.parametrize("qtype", HALF, ids=lambda q: q.name)
@pytest.mark.parametrize("n_cols", [96, 256, 576, 1536])  # 3 blocks (no group of 8), 8, 18 (2 left), 48
@pytest.mark.parametrize("n_tok", [1, 4, 6, 20, 64])  # 1-token dots, 4-token dots, tails, int path, sgemm
def test_matmul_against_gguf_and_f32_scales(qtype, n_cols, n_tok):
    n_rows = 37
    raw = make_raw(qtype, n_rows, n_cols, seed=11 + n_cols)
    w = weights.pack(qtype, raw, n_rows, n_cols)
    x = np.random.default_rng(n_tok).standard_normal((n_tok, n_cols)).astype(np.float32)
    y = mm.matmul(w, x)
    assert _nmse(y, _ref(raw, qtype, n_rows, n_cols, x)) <= 5e-4  # int16 activations
    # the same activations and products through the float32-scale kernels: float rounding apart
    y32 = mm.matmul(_f32_twin(w), x)
    np.testing.assert_allclose(y, y32, rtol=0, atol=2e-6 * float(np.abs(y32).max()))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1], ids=lambda q: q.name)
def test_four_token_dots_bitwise_as_one_token(qtype):
    """18 blocks a row: two groups of 8 and a tail, in the 4-token and 1-token kernels alike."""
    n_rows, n_cols = 21, 576
    rows_bitwise_as_alone(weights.pack(qtype, make_raw(qtype, n_rows, n_cols, seed=5), n_rows, n_cols))


def rows_bitwise_as_alone(w) -> tuple[np.ndarray, np.ndarray]:
    """A 9-token decode call's rows (two 4-token dots and a 1-token tail) against each token alone,
    bit for bit; returns (x, the 9-token output)."""
    n_rows, n_cols = w.n_rows, w.n_cols
    x = np.random.default_rng(2).standard_normal((9, n_cols)).astype(np.float32)
    nb = n_cols // 32

    def dec(xx):
        n = xx.shape[0]
        out = np.empty((n, n_rows), np.float32)
        matmul_int.mm_dec(*w.kernel_args(), xx, np.empty((n, n_cols), np.int16), np.empty((n, nb), np.float32),
                          np.empty((n, nb), np.float32), out)
        return out
    full = dec(x)
    for i in range(9):
        np.testing.assert_array_equal(dec(x[i:i + 1])[0], full[i])
    return x, full


def test_stacked_and_row_views_keep_fp16_scales():
    qt, n_cols = QType.Q5_0, 576
    raws = [make_raw(qt, r, n_cols, seed=r) for r in (16, 5, 40)]
    ws = [weights.pack(qt, raw, raw.shape[0], n_cols) for raw in raws]
    big, views = weights.concat_rows(ws)
    assert big.d.dtype == np.float16 and big.m is None and big.nbytes == sum(w.nbytes for w in ws)
    x = np.random.default_rng(0).standard_normal((1, n_cols)).astype(np.float32)
    y = mm.matmul(big, x)
    r0 = 0
    for w, v in zip(ws, views):
        np.testing.assert_array_equal(mm.matmul(v, x), y[:, r0:r0 + w.n_rows])
        np.testing.assert_array_equal(mm.matmul(w, x), y[:, r0:r0 + w.n_rows])
        r0 += w.n_rows


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q5_1], ids=lambda q: q.name)
def test_tiles_without_blas(qtype, monkeypatch):
    """The fallback prefill path (dequantized tiles + numpy) reads the scales as float32."""
    n_rows, n_cols = 33, 576
    raw = make_raw(qtype, n_rows, n_cols, seed=8)
    w = weights.pack(qtype, raw, n_rows, n_cols)
    x = np.random.default_rng(4).standard_normal((40, n_cols)).astype(np.float32)
    y = mm.matmul(w, x, use_blas=False, gemm_min_tokens=32)
    ref = _ref(raw, qtype, n_rows, n_cols, x)
    assert _nmse(y, ref) <= 1e-10  # float32 weights exactly, float32 products


@pytest.mark.parametrize("nb", [3, 6, 18])  # a tail only; one group and a tail of 2; 4 groups and 2
def test_paired_int16_activations_are_the_plain_ones_reordered(nb):
    """matmul_int.ACT_I16P (what the "nibw" kernels read): the same int16 values and scales as the
    plain format, blocks of whole groups of 4 in pairs (8-value chunk k of A at 64p + 16k, of B at
    64p + 16k + 8), the last nb % 4 blocks in place."""
    from lstream.backends.cpu import matmul_int as mi
    x = np.random.default_rng(nb).standard_normal((2, 32 * nb)).astype(np.float32)
    out = {}
    for fmt in (mi.ACT_I16, mi.ACT_I16P):
        xq, xd, xs = np.zeros((2, 32 * nb), np.int16), np.zeros((2, nb), np.float32), np.zeros((2, nb), np.float32)
        mi.quant_x(x, xq, xd, xs, fmt)
        out[fmt] = xq, xd, xs
    (plain, d0, s0), (paired, d1, s1) = out[mi.ACT_I16], out[mi.ACT_I16P]
    np.testing.assert_array_equal(d0, d1)
    np.testing.assert_array_equal(s0, s1)
    ng4 = nb // 4 * 4
    pos = [64 * (b >> 1) + 16 * (j >> 3) + 8 * (b & 1) + (j & 7) if b < ng4 else 32 * b + j
           for b in range(nb) for j in range(32)]
    np.testing.assert_array_equal(paired[:, pos], plain)
