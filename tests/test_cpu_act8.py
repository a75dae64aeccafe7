"""int8 activations for the "nibw" weights (Options.cpu_act8, matmul_int.L_NIBW8): quant_row8's block
order and scales, the 1-token and 4-token vpmaddubsw dots against gguf-py's dequantization (with the
int8 activations themselves: float rounding only; with the float32 x: int8 quantization's error), and
every token of a batch bitwise the same as alone (the engine's concurrency invariance)."""
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
from tests.test_cpu_nib_half import rows_bitwise_as_alone

pytestmark = pytest.mark.skipif(not HAVE_AVX2, reason="the repacked layouts need AVX2")
ORDER = np.array([(k >> 1) + 16 * (k & 1) + 8 * (j >> 4) for j in range(32) for k in [j & 15]])


def _quant8(x):
    """quant_row8 of every row: (int8 values in x's own order, xd, xs)."""
    n_tok, n = x.shape
    xq = np.zeros((n_tok, n), np.int16)
    xd = np.zeros((n_tok, n // 32), np.float32)
    xs = np.zeros_like(xd)
    matmul_int.quant_x(x, xq, xd, xs, matmul_int.ACT_I8P)
    nb = n // 32
    ng4 = nb // 4 * 4
    raw = xq.view(np.int8)[:, :n]
    # blocks of whole groups of 4 in pairs: A's first 16 bytes, B's first 16, A's second, B's second
    pos = np.array([64 * (b >> 1) + 32 * (j >> 4) + 16 * (b & 1) + (j & 15) if b < ng4 else 32 * b + j
                    for b in range(nb) for j in range(32)])
    q8 = raw[:, pos].reshape(n_tok, nb, 32)
    vals = np.empty_like(q8)
    vals[:, :, ORDER] = q8  # byte j of a block holds value ORDER[j]
    return vals.reshape(n_tok, n), xd, xs


@pytest.mark.parametrize("nb", [3, 6])  # a tail only; a group of 4 (two pairs) and a tail of 2
def test_quant_row8_order_and_scales(nb):
    x = np.random.default_rng(0).standard_normal((3, 32 * nb)).astype(np.float32)
    x[1, 32:64] = 0  # an all-zero block: scale 0, values 0
    q, xd, xs = _quant8(x)
    deq = q.astype(np.float64).reshape(3, nb, 32) * xd[:, :, None]
    amax = np.abs(x.reshape(3, nb, 32)).max(axis=2)
    np.testing.assert_allclose(xd, amax / 127, rtol=1e-6)
    assert np.abs(q).max() <= 127 and (q[1, 32:64] == 0).all()
    assert np.all(np.abs(deq - x.reshape(3, nb, 32)) <= xd[:, :, None] / 2 * (1 + 1e-5))
    np.testing.assert_allclose(xs, xd * q.reshape(3, nb, 32).sum(axis=2), rtol=1e-6)


def _packed(qtype, n_rows, n_cols, seed):
    raw = make_raw(qtype, n_rows, n_cols, seed=seed)
    w = weights.pack(qtype, raw, n_rows, n_cols)
    w.act8 = True
    assert w.int8_act and w.kernel_args()[0][0] == matmul_int.L_NIBW8
    return raw, w


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("n_cols", [96, 576, 1536])  # 3 blocks (a tail only), 18 (groups + tail), 48
@pytest.mark.parametrize("n_tok", [1, 4, 7, 20])  # 1-token dots, 4-token dots + tail, the int path
def test_matmul_against_gguf(qtype, n_cols, n_tok):
    n_rows = 37
    raw, w = _packed(qtype, n_rows, n_cols, 11 + n_cols)
    x = np.random.default_rng(n_tok).standard_normal((n_tok, n_cols)).astype(np.float32)
    y = mm.matmul(w, x).astype(np.float64)
    wf = gq.dequantize(raw, G(int(qtype))).reshape(n_rows, n_cols).astype(np.float64)
    q, xd, _ = _quant8(x)
    x8 = (q.reshape(n_tok, -1, 32) * xd[:, :, None].astype(np.float64)).reshape(n_tok, n_cols)
    # the kernel's own activations: float32 accumulation of exact integer block sums only
    scale = np.abs(x8) @ np.abs(wf).T
    assert np.all(np.abs(y - x8 @ wf.T) <= 1e-5 * scale + 1e-6)
    # against the float32 x: int8 quantization (|error| <= xd/2 a value), measured ~1e-4 NMSE
    ref = x.astype(np.float64) @ wf.T
    assert float(np.sum((y - ref) ** 2) / np.sum(ref ** 2)) <= 1e-3


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1], ids=lambda q: q.name)
def test_batch_rows_bitwise_as_alone(qtype):
    """Rows of a 9-token decode call (two 4-token dots and a 1-token tail) are the 1-token results."""
    _, w = _packed(qtype, 21, 576, 5)
    x, full = rows_bitwise_as_alone(w)
    np.testing.assert_array_equal(mm.matmul(w, x[:3]), full[:3])  # the int path (quant_x + mm_int) too


def test_stacked_views_keep_act8():
    qt, n_cols = QType.Q4_1, 576
    ws = [_packed(qt, r, n_cols, r)[1] for r in (16, 5)]
    big, views = weights.concat_rows(ws)
    assert big.int8_act and all(v.int8_act for v in views)
    x = np.random.default_rng(0).standard_normal((5, n_cols)).astype(np.float32)
    y = mm.matmul(big, x)
    np.testing.assert_array_equal(mm.matmul(views[1], x), y[:, 16:])
    np.testing.assert_array_equal(mm.matmul(ws[0], x), y[:, :16])


@pytest.mark.parametrize("given,threshold,want", [(None, None, False), (None, 1, True), (False, 1, False),
                                                  (True, None, True)])
def test_act8_default_by_host_weight_bytes(tmp_path, monkeypatch, given, threshold, want):
    """Options.cpu_act8=None: int8 activations where the CPU's matmul weights reach ACT8_AUTO_BYTES
    (a memory-bound decode), int16 below; an explicit choice always stands."""
    from lstream.api import Model
    from lstream.backends.cpu import backend as cpu_backend
    from lstream.core.options import Options
    from lstream.loaders.model_file import load_model
    from lstream.tools.synth_model import write_model
    if threshold is not None:
        monkeypatch.setattr(cpu_backend, "ACT8_AUTO_BYTES", threshold)
    path = write_model(tmp_path / "tiny.gguf", "tiny", "Q4_0", seed=2)
    m = Model(load_model(path), device=None, n_ctx=32, load_tokenizer=False, options=Options(cpu_act8=given))
    try:
        be = m.backends[0] if isinstance(m.backends, list) else m.backends["cpu"]
        assert be.act8 is want
        assert all(w.act8 is want for w in be._packed.values())
    finally:
        m.close()
