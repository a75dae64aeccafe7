"""CPU kernels: bit-exact dequantize vs gguf-py, matmul / get_rows / float ops vs float64 references."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

from lstream.backends.cpu import blocks, dequant, ops, weights
from lstream.backends.cpu.llvm_ir import HAVE_AVX2
from lstream.backends.cpu.matmul import matmul
from lstream.core.qtypes import QTYPE_INFO, QType

QUANT = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K]
ALL = [QType.F32, QType.F16, QType.BF16] + QUANT
# byte offsets of fp16 scale fields that random blocks must hold sane values in
_FP16_FIELDS = {QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,)}


def make_raw(qtype: QType, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """Random GGUF data for `qtype` as uint8 (n_rows, row_bytes) (or the float dtype for F32/F16)."""
    rng = np.random.default_rng(seed)
    if qtype in _FP16_FIELDS:
        info = QTYPE_INFO[qtype]
        nb = n_rows * n_cols // info.block_size
        blocks = rng.integers(0, 256, size=(nb, info.type_size), dtype=np.uint8)
        for off in _FP16_FIELDS[qtype]:
            sc = (rng.uniform(0.2, 1.0, nb) * rng.choice([-1, 1], nb) * 1e-2).astype(np.float16)
            if qtype != QType.Q6_K:
                sc = np.abs(sc)
            blocks[:, off:off + 2] = sc.view(np.uint8).reshape(nb, 2)
        return blocks.reshape(n_rows, -1)
    data = (rng.standard_normal((n_rows, n_cols)) * rng.uniform(0.5, 2.0, (n_rows, 1))).astype(np.float32)
    q = gq.quantize(data, G(int(qtype)))
    if qtype == QType.F32:
        return q
    if qtype == QType.F16:
        return q
    return q.view(np.uint8).reshape(n_rows, -1)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_dequantize_bit_exact(qtype):
    n_rows, n_cols = 7, 512
    raw = make_raw(qtype, n_rows, n_cols, seed=int(qtype))
    ref = gq.dequantize(raw, G(int(qtype))).reshape(n_rows, n_cols).astype(np.float32)
    got = dequant.dequantize(qtype, raw, n_cols)
    assert got.dtype == np.float32 and got.shape == (n_rows, n_cols)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_dequantize_bf16_as_uint16():
    raw = make_raw(QType.BF16, 3, 64)
    ref = gq.dequantize(raw, G.BF16).reshape(3, 64)
    got = dequant.dequantize(QType.BF16, raw.view(np.uint16), 64)
    np.testing.assert_array_equal(got, ref)


def _nmse(y, ref):
    return float(np.sum((y.astype(np.float64) - ref) ** 2) / np.sum(ref ** 2))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@pytest.mark.parametrize("n_tok", [1, 3, 64])
def test_matmul(qtype, n_tok):
    n_rows, n_cols = 67, 768  # odd row count exercises row-tile tails
    raw = make_raw(qtype, n_rows, n_cols, seed=100 + int(qtype))
    w = weights.pack(qtype, raw, n_rows, n_cols)
    assert w.qtype == qtype and w.n_rows == n_rows and w.n_cols == n_cols and w.nbytes > 0
    if HAVE_AVX2 and qtype in QUANT:
        assert w.layout in ("nib", "nib5", "nibw", "nib5h", "i8", "i8s16", "blk")
        assert w.nbytes <= 1.6 * raw.nbytes  # repacked stays near the quantized size
    wf = gq.dequantize(raw, G(int(qtype))).reshape(n_rows, n_cols).astype(np.float64)
    x = np.random.default_rng(n_tok).standard_normal((n_tok, n_cols)).astype(np.float32)
    ref = x.astype(np.float64) @ wf.T
    y = matmul(w, x)
    assert y.shape == (n_tok, n_rows) and y.dtype == np.float32
    assert _nmse(y, ref) <= 5e-4
    out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
    y2 = matmul(w, x, out=out)
    assert y2 is out
    assert _nmse(out, ref) <= 5e-4


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_1, QType.Q6_K, QType.F16], ids=lambda q: q.name)
def test_get_rows(qtype):
    n_rows, n_cols = 50, 256
    raw = make_raw(qtype, n_rows, n_cols, seed=7)
    w = weights.pack(qtype, raw, n_rows, n_cols)
    ids = np.array([3, 0, 49, 3, 17])
    ref = gq.dequantize(raw, G(int(qtype))).reshape(n_rows, n_cols)[ids]
    np.testing.assert_array_equal(weights.get_rows(w, ids), ref)


def test_rms_norm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 576)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-5), ref, rtol=1e-4, atol=1e-5)
    out = np.empty_like(x)
    assert ops.rms_norm(x, w, 1e-5, out=out) is out
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_swiglu_gelu():
    rng = np.random.default_rng(2)
    g = (rng.standard_normal((4, 1536)) * 4).astype(np.float32)
    u = rng.standard_normal((4, 1536)).astype(np.float32)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(ops.swiglu(g, u), g64 / (1 + np.exp(-g64)) * u, rtol=1e-4, atol=1e-5)
    ref = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3)))
    np.testing.assert_allclose(ops.gelu_tanh(g), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAVE_AVX2, reason="blk layout needs AVX2")
@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("n_tok", [1, 3, 64])
def test_matmul_blk_layout(qtype, n_tok):
    """The GGUF-blocks-in-place layout (default for Q8_0 only; Options.cpu_blk="all" for the others)."""
    blk = weights.blk_types("all")
    assert blk == frozenset(blocks.QTYPES)
    n_rows, n_cols = 37, 512
    raw = make_raw(qtype, n_rows, n_cols, seed=200 + int(qtype))
    w = weights.pack(qtype, raw, n_rows, n_cols, blk)
    assert w.layout == "blk" and w.nbytes == raw.nbytes
    wf = gq.dequantize(raw, G(int(qtype))).reshape(n_rows, n_cols).astype(np.float64)
    x = np.random.default_rng(n_tok).standard_normal((n_tok, n_cols)).astype(np.float32)
    ref = x.astype(np.float64) @ wf.T
    assert _nmse(matmul(w, x), ref) <= 5e-4
    big, (a, b) = weights.concat_rows([w, weights.pack(qtype, raw[:5], 5, n_cols, blk)])
    assert _nmse(matmul(big, x)[:, :n_rows], ref) <= 5e-4
    assert _nmse(matmul(b, x), ref[:, :5]) <= 5e-4
