"""The fused dequantizing GEMM (backends/cuda/qgemm.py) and its selection (matmul_choice.py).

Oracle: gguf.quants.dequantize, then x @ W^T in float64. Tolerance: normalized MSE
sum((y - ref)^2) / sum(ref^2) <= 1e-4 (NMSE_TOL). Both operands are rounded to bf16 (8
significant bits: relative error <= 2^-8 rounding to nearest on the GPU, < 2^-7 truncating in the
interpreter), so each product carries that much noise: NMSE ~3e-6 on the GPU, ~1e-5 in the
interpreter; the fp32 sums add ~1e-12. A wrong bit in the unpacking can hide under such a bound,
so a second check multiplies by the identity: every output is then one weight, which must equal
the oracle's to bf16 precision (|y - w| < 2^-7 |w|), plus 2^-14 of the largest |w| of its 16
(the kernel adds a block's min, or subtracts K-quants' dmin * min, with one more fp32 rounding
than gguf: near-cancelling values can move by ~2^-22 of their block; one quant step is >= 2^-8).

CPU: the kernel runs in Triton's interpreter (the `interp` fixture installs interpreted copies of
the kernels and sets TRITON_INTERPRET=1, whatever the environment held at import) on small
shapes: M not a multiple of BM, N not a multiple of BN, K of several blocks. GPU (marker gpu):
every candidate config on 1000 x 4096 weights, the identity check, the backend's choice (4096^2, M=512).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lstream.backends.cuda import matmul_choice as mc
from lstream.backends.cuda import qgemm as qg
from lstream.backends.cuda import repack
from lstream.core.qtypes import QTYPE_INFO, QType
from test_cuda_kernels import _data  # random GGUF blocks with random finite fp16 scales

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not qg.HAVE_TRITON, reason="needs triton")

NMSE_TOL = 1e-4
TYPES = sorted(qg.TYPES)
PACKED = sorted(repack.TYPES)
# (BM, BN, BK, SWAP, SPLIT): W as the dot's first operand or second, K split or not (qg.fit makes BK
# legal: Q4_K/Q5_K tiles of 64 start inside a super-block, Q6_K's are halves)
SMALL_CFGS = [qg.Cfg(16, 32, 64, 1, 1, 4, 2), qg.Cfg(32, 16, 128, 0, 2, 4, 2)]


def nmse(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    assert torch.isfinite(y).all()
    return float(((y - ref) ** 2).sum() / (ref ** 2).sum())


def oracle(a: np.ndarray, qt: QType, n: int, k: int) -> torch.Tensor:
    w = gguf.quants.dequantize(a, gguf.GGMLQuantizationType(int(qt)))
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)).reshape(n, k)


def weight(a: np.ndarray, qt: QType, n: int, k: int, packed: bool, dev="cpu"):
    t = torch.from_numpy(a).to(dev)
    return repack.repack(t, qt, n, k) if packed else t


@pytest.fixture
def interp(monkeypatch):
    """Interpreted copies of every Triton function of qgemm (their calls resolve through the
    module, so the kernel's helpers are the interpreted ones too)."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name, v in list(vars(qg).items()):
        if isinstance(v, (triton.runtime.JITFunction, InterpretedFunction)):
            monkeypatch.setattr(qg, name, InterpretedFunction(v.fn))


def _cases():
    for qt in TYPES:
        yield pytest.param(qt, False, id=f"{qt.name}")
        if qt in repack.TYPES:
            yield pytest.param(qt, True, id=f"{qt.name}-packed")


@pytest.mark.parametrize("qt,packed", list(_cases()))
def test_matches_gguf(interp, qt, packed):
    bs = QTYPE_INFO[qt].block_size
    n, k, m = 40, 2 * max(bs, 128), 21  # 8 blocks of 32 / 2 super-blocks
    a = _data(qt, n, k, seed=int(qt))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ oracle(a, qt, n, k).t()
    for cfg in SMALL_CFGS:
        y = qg.qgemm(x, weight(a, qt, n, k, packed), qt, n, k, out_dtype=torch.float32, cfg=qg.fit(cfg, qt, k))
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert nmse(y, ref) <= NMSE_TOL, cfg


@pytest.mark.parametrize("qt,packed", list(_cases()))
def test_every_weight_exact(interp, qt, packed):
    """x = I: y[j, r] = W[r, j], one product each; every unpacked value must be the oracle's."""
    k = 256
    n = 24
    a = _data(qt, n, k, seed=int(qt) + 50)
    y = qg.qgemm(torch.eye(k), weight(a, qt, n, k, packed), qt, n, k, out_dtype=torch.float32,
                 cfg=qg.fit(qg.Cfg(64, 32, 64, 1, 1, 4, 2), qt, k))
    w = oracle(a, qt, n, k).float()
    tol = w.abs() * 2.0 ** -7 + w.abs().reshape(n, k // 16, 16).amax(2).repeat_interleave(16, 1) * 2.0 ** -14
    assert torch.all((y.t() - w).abs() <= tol), ((y.t() - w).abs() - tol).max()


@pytest.mark.parametrize("qt", [QType.Q8_0, QType.Q4_K, QType.Q6_K], ids=lambda q: q.name)
def test_large_values(interp, qt):
    """Scales near 1 and activations in the thousands: |y| ~ 1e6..1e7 stays finite and accurate
    in bf16 out (fp32 accumulation; fp16 operands or sums would overflow at 65504)."""
    n, k, m = 33, 512, 17
    rng = np.random.default_rng(3)
    info = QTYPE_INFO[qt]
    a = _data(qt, n, k, seed=9)
    blk = a.reshape(-1, info.type_size)
    off = 208 if qt == QType.Q6_K else 0
    blk[:, off:off + 2] = rng.uniform(0.5, 2.0, blk.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)) * 3000.0
    ref = x.double() @ oracle(a, qt, n, k).t()
    assert ref.abs().max() > 1e5
    for out_dtype in (torch.float32, torch.bfloat16):
        y = qg.qgemm(x.bfloat16(), torch.from_numpy(a), qt, n, k, out_dtype=out_dtype, cfg=qg.fit(SMALL_CFGS[1], qt, k))
        assert y.dtype == out_dtype and nmse(y, ref) <= NMSE_TOL


def test_default_configs_and_packed_rows(interp):
    """The table's configs (128-wide tiles over 40 rows) and a Packed row view of a stack."""
    qt, n, k = QType.Q4_0, 40, 512
    a = _data(qt, n, k, seed=11)
    big = repack.repack(torch.from_numpy(_data(qt, n + 7, k, seed=12)), qt, n + 7, k)
    stack = repack.concat([big, repack.repack(torch.from_numpy(a), qt, n, k)])
    ref = oracle(a, qt, n, k)
    for m in (9, 70):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        cfg = qg.candidates(qt, n, k, m)[0]
        y = qg.qgemm(x, stack.rows(n + 7, 2 * n + 7), qt, n, k)
        assert y.dtype == torch.bfloat16 and cfg.bn > n  # a tile wider than the weight
        assert nmse(y, x.double() @ ref.t()) <= NMSE_TOL


def test_torch_fallback(monkeypatch):
    """Off the GPU without the interpreter: dequantize in torch, the same bf16 operand values."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qt, n, k = QType.Q5_1, 12, 128
    a = _data(qt, n, k, seed=4)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(6))
    for packed in (False, True):
        y = qg.qgemm(x, weight(a, qt, n, k, packed), qt, n, k)
        assert y.dtype == torch.float32 and nmse(y, x.double() @ oracle(a, qt, n, k).t()) <= NMSE_TOL


def test_candidates_tile_k():
    for qt, k in [(QType.Q4_0, 4096), (QType.Q4_0, 14336), (QType.Q8_0, 2880), (QType.Q6_K, 4096)]:
        for m in (9, 16, 64, 512, 4096):
            for c in qg.candidates(qt, 1024, k, m):
                assert c.bk % 32 == 0 and k % (c.bk * c.split) == 0
                assert QTYPE_INFO[qt].block_size != 256 or 256 % c.bk == 0
    assert qg.candidates(QType.Q4_0, 1024, 4096, 16)[0].split > 1  # 16 tiles: split K
    assert qg.candidates(QType.Q4_0, 14336, 4096, 2048)[0].split == 1


def test_bad_arguments():
    a = torch.from_numpy(_data(QType.Q4_0, 4, 64, seed=1))
    with pytest.raises(ValueError, match="x must be"):
        qg.qgemm(torch.randn(3, 32), a, QType.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="bytes"):
        qg.qgemm(torch.randn(3, 64), a, QType.Q4_0, 5, 64)
    with pytest.raises(ValueError, match="bytes"):
        qg.qgemm(torch.randn(3, 64), a, QType.Q2_K, 4, 64)


def test_choice_cached_and_not_during_capture(interp, monkeypatch):
    """The measured winner is kept per key; a capture with no choice yet takes the current path."""
    qt, n, k = QType.Q4_K, 40, 256
    a = torch.from_numpy(_data(qt, n, k, seed=5))
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(4))
    ref = x.double() @ oracle(a.numpy(), qt, n, k).t()
    calls = []

    def dequant():
        calls.append(1)
        return torch.from_numpy(gguf.quants.dequantize(a.numpy(), gguf.GGMLQuantizationType(int(qt)))).bfloat16()

    monkeypatch.setattr(mc, "_choice", {})
    monkeypatch.setattr(mc, "_capturing", lambda x: True)
    monkeypatch.setattr(mc, "_time", lambda fn, dev: pytest.fail("timed during capture"))
    assert nmse(mc.matmul(x, a, qt, n, k, torch.bfloat16, dequant), ref) <= NMSE_TOL
    assert mc.choices() == {} and calls  # the current path, nothing decided
    monkeypatch.setattr(mc, "_capturing", lambda x: False)
    times = iter([2.0, 1.0, 3.0])  # cuBLAS, then the candidates: the first wins
    monkeypatch.setattr(mc, "_time", lambda fn, dev: (fn(), next(times))[1])
    y = mc.matmul(x, a, qt, n, k, torch.bfloat16, dequant)
    (key, cfg), = mc.choices().items()
    assert cfg == qg.candidates(qt, n, k, 20)[0] and key[4] == 32 and y.dtype == torch.bfloat16
    calls.clear()
    y = mc.matmul(x[:17], a, qt, n, k, torch.bfloat16, dequant)  # same bucket: no timing, no dequantize
    assert not calls and nmse(y, ref[:17]) <= NMSE_TOL
    y = mc.matmul(x, a, qt, n, k, torch.float32, lambda: dequant().float())  # fp32: always the float matmul
    assert y.dtype == torch.float32 and nmse(y, ref) <= NMSE_TOL
    assert len(mc.choices()) == 1


def test_choice_needs_a_clear_win(interp, monkeypatch):
    """A fused config within MARGIN of dequantize + cuBLAS does not replace it (the fastest of
    several noisy timings reads low)."""
    qt, n, k = QType.Q4_0, 40, 256
    a = torch.from_numpy(_data(qt, n, k, seed=6))
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(7))
    w = torch.from_numpy(gguf.quants.dequantize(a.numpy(), gguf.GGMLQuantizationType(int(qt)))).bfloat16()
    n_cand = len(qg.candidates(qt, n, k, 20))
    for first, want_cublas in ((0.95, True), (0.85, False)):
        monkeypatch.setattr(mc, "_choice", {})
        monkeypatch.setattr(mc, "_capturing", lambda x: False)
        times = iter([1.0, first] + [5.0] * n_cand)
        monkeypatch.setattr(mc, "_time", lambda fn, dev: next(times))
        mc.matmul(x, a, qt, n, k, torch.bfloat16, lambda: w)
        (cfg,) = mc.choices().values()
        assert (cfg is None) == want_cublas


# --- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qt,packed", list(_cases()))
@pytest.mark.parametrize("m", [9, 64, 300])
def test_gpu_candidates(qt, packed, m):
    """Every candidate config of the token bucket (compiled for the device) on a 1000 x 4096 weight:
    1000 rows leave partial row tiles, 9 and 300 tokens partial token tiles."""
    n, k = 1000, 4096
    a = _data(qt, n, k, seed=m)
    w = weight(a, qt, n, k, packed, "cuda")
    x = torch.randn(m, k, device="cuda").bfloat16()
    ref = x.double().cpu() @ oracle(a, qt, n, k).t()
    for cfg in qg.candidates(qt, n, k, m, "cuda"):
        y = qg.qgemm(x, w, qt, n, k, out_dtype=torch.float32, cfg=cfg)
        assert nmse(y, ref) <= NMSE_TOL, cfg  # round to nearest: ~4e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qt,packed", list(_cases()))
def test_gpu_every_weight_exact(qt, packed):
    """The identity check of the interpreter test, with each default config compiled for the GPU
    (round to nearest: within 2^-8 of each weight)."""
    k, n = 512, 200
    a = _data(qt, n, k, seed=int(qt) + 70)
    w = oracle(a, qt, n, k).float()
    tol = w.abs() * 2.0 ** -8 + w.abs().reshape(n, k // 16, 16).amax(2).repeat_interleave(16, 1) * 2.0 ** -14
    for m in (16, 64, 512):
        x = torch.eye(k, device="cuda")[:m]
        y = qg.qgemm(x, weight(a, qt, n, k, packed, "cuda"), qt, n, k, out_dtype=torch.float32).cpu()
        assert torch.all((y.t() - w[:, :m]).abs() <= tol[:, :m]), m


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qt", [QType.Q4_0, QType.Q4_K, QType.Q6_K], ids=lambda q: q.name)
def test_gpu_choice(qt, monkeypatch):
    """The backend's path: a measured choice, the same numbers either way, then graph capture."""
    from lstream.backends.cuda import dequant as ck
    monkeypatch.setattr(mc, "_choice", {})
    n, k, m = 4096, 4096, 512
    a = _data(qt, n, k, seed=7)
    w = torch.from_numpy(a).cuda()
    x = torch.randn(m, k, device="cuda").bfloat16()
    deq = lambda: ck.dequantize(w, qt, k, dtype=torch.bfloat16)  # noqa: E731
    y = mc.matmul(x, w, qt, n, k, torch.bfloat16, deq)
    assert len(mc.choices()) == 1 and y.dtype == torch.bfloat16
    assert nmse(y, x.double().cpu() @ oracle(a, qt, n, k).t()) <= 1e-5
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = mc.matmul(x, w, qt, n, k, torch.bfloat16, deq)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, y)
