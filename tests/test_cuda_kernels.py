"""GPU dequantization against gguf.quants.dequantize (the oracle).

Tolerance: the kernels compute each weight in fp32 like the oracle and round once to bf16/fp16,
so the result equals the oracle rounded to the output dtype; we allow one output ulp where fp32
FMA contraction moved the last fp32 bit before rounding. The torch fallback is checked on the CPU
in every run; the Triton kernels on the GPU (marker gpu) and, when Triton is installed, on the CPU
through its interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lstream.backends.cuda import dequant as ck
from lstream.backends.cuda import norm_rope
from lstream.core.qtypes import QTYPE_INFO, QType
from lstream.tools.synth_model import random_tensor

gguf = pytest.importorskip("gguf")

QUANTS = list(ck.QUANT_TYPES)
ALL = QUANTS + [QType.F16, QType.BF16, QType.F32]


def _data(qt: QType, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = random_tensor(rng, "w", (rows, cols), qt)
    if qt in QUANTS:
        # fully random scale fields too (finite only): subnormals, negatives, large values
        info = QTYPE_INFO[qt]
        blk = a.reshape(-1, info.type_size)
        for off, _ in ck_scale_fields(qt):
            s = (rng.standard_normal(blk.shape[0]) * 10.0 ** rng.integers(-7, 1, blk.shape[0])).astype(np.float16)
            blk[:, off:off + 2] = s.view(np.uint8).reshape(-1, 2)
    return a


def ck_scale_fields(qt):
    from lstream.tools.synth_model import _SCALES
    return _SCALES[qt]


def _oracle(a: np.ndarray, qt: QType, rows: int, cols: int) -> torch.Tensor:
    if qt == QType.BF16:
        ref = gguf.quants.dequantize(a.view(np.uint8), gguf.GGMLQuantizationType.BF16)
    elif qt in (QType.F16, QType.F32):
        ref = a.astype(np.float32)
    else:
        ref = gguf.quants.dequantize(a, gguf.GGMLQuantizationType(int(qt)))
    return torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(rows, cols)


def _to_dev(a: np.ndarray, qt: QType, dev) -> torch.Tensor:
    if qt in QUANTS:
        return torch.from_numpy(a).to(dev)
    return torch.from_numpy(a.view(np.uint8).reshape(a.shape[0], -1).copy()).to(dev)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    got = out.float().cpu()
    want = ref.to(dtype).float()
    assert torch.isfinite(got).all()
    exact = got == want
    if not bool(exact.all()):
        # one ulp of the output dtype, relative to the value
        ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
        bad = ~exact & ((got - want).abs() > ulp * 1.01)
        assert not bool(bad.any()), f"{int(bad.sum())} values off by more than 1 ulp, e.g. {got[bad][:4]} vs {want[bad][:4]}"
        assert float((~exact).float().mean()) < 1e-3


@pytest.mark.parametrize("qt", ALL, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_fallback_matches_gguf(qt, dtype):
    rows, cols = 7, 512
    a = _data(qt, rows, cols, seed=int(qt) + 1)
    x = _to_dev(a, qt, "cpu")
    out = ck.dequantize(x, qt, cols, dtype=dtype, use_triton=False)
    if dtype == torch.float16:
        ref = _oracle(a, qt, rows, cols)
        if ref.abs().max() > 6e4:  # random fp16 scales can overflow fp16 outputs; bf16 covers range
            pytest.skip("values outside fp16 range")
    _check(out, _oracle(a, qt, rows, cols), dtype)


@pytest.mark.skipif(not ck.HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton interpreter not enabled (TRITON_INTERPRET=1 with triton installed)")
@pytest.mark.parametrize("qt", QUANTS, ids=lambda q: q.name)
def test_triton_interpreter_matches_gguf(qt):
    rows, cols = 5, 768 if QTYPE_INFO[qt].block_size == 256 else 96
    a = _data(qt, rows, cols, seed=int(qt) + 7)
    # fp32 output: the interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest),
    # so compare the fp32 values, which must be bit-exact
    out = torch.full((rows, cols), float("nan"), dtype=torch.float32)
    ck.dequantize(torch.from_numpy(a), qt, cols, out=out, use_triton=True)
    assert torch.equal(out, _oracle(a, qt, rows, cols))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qt", ALL, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(3, 256), (4096, 4096), (1000, 14336 // 2)])
def test_gpu_dequant_matches_gguf(qt, shape):
    rows, cols = shape
    a = _data(qt, rows, cols, seed=rows + int(qt))
    x = _to_dev(a, qt, "cuda")
    out = torch.full((rows, cols), float("nan"), dtype=torch.bfloat16, device="cuda")  # poisoned
    ck.dequantize(x, qt, cols, out=out)
    torch.cuda.synchronize()
    _check(out, _oracle(a, qt, rows, cols), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not ck.HAVE_TRITON, reason="needs CUDA and Triton")
def test_gpu_triton_equals_torch_fallback():
    for qt in QUANTS:
        a = _data(qt, 64, 4096, seed=3)
        x = torch.from_numpy(a).cuda()
        t = ck.dequantize(x, qt, 4096, use_triton=True)
        f = ck.dequantize(x, qt, 4096, use_triton=False)
        torch.cuda.synchronize()
        assert (t.float() - f.float()).abs().max() <= (f.float().abs() * 2 ** -8).max(), qt.name


def _small_ops_check(dev, use_triton, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 6 * 64, generator=g) * 3
    w = torch.rand(6 * 64, generator=g) + 0.5
    ref = norm_rope.rms_norm(x, w, 1e-5, torch.float32, use_triton=False)
    got = norm_rope.rms_norm(x.to(dev), w.to(dev), 1e-5, dtype, use_triton=use_triton).float().cpu()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got, ref, rtol=tol, atol=tol)
    pos = torch.arange(5, 42, dtype=torch.float64)
    freqs = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ang = pos[:, None] * freqs[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    for neox in (False, True):
        ref = norm_rope.rope(x, cos, sin, 6, 64, 64, neox, torch.float32, use_triton=False)
        got = norm_rope.rope(x.to(dev), cos.to(dev), sin.to(dev), 6, 64, 64, neox, dtype, use_triton=use_triton)
        assert torch.allclose(got.float().cpu(), ref, rtol=tol, atol=tol * 3)


def test_small_ops_torch_path_self_consistent():
    _small_ops_check("cpu", False, torch.float32)


@pytest.mark.skipif(not ck.HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton interpreter not enabled (TRITON_INTERPRET=1 with triton installed)")
def test_small_ops_triton_interpreter():
    _small_ops_check("cpu", True, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not ck.HAVE_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_small_ops(dtype):
    _small_ops_check("cuda", True, dtype)
