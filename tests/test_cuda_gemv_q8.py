"""Repacked blocks (backends/cuda/repack.py) and the int8-activation GEMV (gemv_q8.py).

repack -> to_blocks is the identity on GGUF bytes, and the repacked weight dequantizes bit-exactly
as gguf.quants.dequantize. The GEMV against x @ dequantize(W)^T in float64: normalized MSE under
5e-4 (ggml's bound for quantized matmuls; x quantized to int8 per 32 values, as llama.cpp's MMVQ).
On a GPU (marker gpu: the Gluon kernel, gemv_q8_gluon.py) and, with TRITON_INTERPRET=1, in the
Triton interpreter (the Triton kernel, dp4a emulated)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lstream.backends.cuda import gemv_q8, repack
from lstream.core.qtypes import QTYPE_INFO, QType

INTERPRET = gemv_q8.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton interpreter not enabled"))]
TYPES = sorted(repack.TYPES, key=lambda t: t.name)


def _blocks(qt: QType, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    """Random GGUF blocks with finite fp16 scales (and mins) of real sizes."""
    rng = np.random.default_rng(seed)
    info = QTYPE_INFO[qt]
    nb = n_rows * n_cols // 32
    b = rng.integers(0, 256, (nb, info.type_size), dtype=np.uint8)
    b[:, 0:2] = (rng.uniform(0.5, 1.5, nb) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if repack.LAYOUT[qt][1] >= 0:
        b[:, 2:4] = (rng.uniform(-1, 1, nb) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b.reshape(n_rows, -1)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_repack_roundtrip_and_dequantize(qt):
    import gguf
    raw = _blocks(qt, 6, 256, 1)
    p = repack.repack(torch.from_numpy(raw), qt, 6, 256)
    assert torch.equal(repack.to_blocks(p), torch.from_numpy(raw))
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(qt)))
    got = gemv_q8.dequantize(p).numpy()
    assert np.array_equal(got, ref.astype(np.float32))
    stacked = repack.concat([p, repack.repack(torch.from_numpy(_blocks(qt, 3, 256, 2)), qt, 3, 256)])
    assert torch.equal(gemv_q8.dequantize(stacked.rows(0, 6)), gemv_q8.dequantize(p))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_gemv_q8(dev, qt, batch):
    n_rows, n_cols = (300, 512) if dev == "cpu" else (4096, 4096)
    raw = torch.from_numpy(_blocks(qt, n_rows, n_cols, 3)).to(dev)
    p = repack.repack(raw, qt, n_rows, n_cols)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, n_cols, generator=g)
    x[:, 7] = 300.0  # an outlier feature: its block's scale follows it
    x = x.to(dev)
    ref = x.double().cpu() @ gemv_q8.dequantize(p).double().cpu().t()
    got = gemv_q8.gemv(x, p).double().cpu()
    nmse = float(((got - ref) ** 2).sum() / (ref ** 2).sum())
    assert got.shape == (batch, n_rows) and nmse < 5e-4, nmse


@pytest.mark.gpu
@pytest.mark.parametrize("qt", [QType.Q4_0, QType.Q5_1, QType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(300, 576), (1000, 14336), (7, 1536)], ids=str)
def test_gemv_q8_odd_shapes(qt, shape):
    """Rows not a multiple of a program's rows; 18, 448 and 48 blocks per row (fewer blocks per
    step than threads, several steps): the GPU kernel's shape handling, batch 1 and 5."""
    n_rows, n_cols = shape
    p = repack.repack(torch.from_numpy(_blocks(qt, n_rows, n_cols, 4)).cuda(), qt, n_rows, n_cols)
    for batch in (1, 5):
        x = torch.randn(batch, n_cols, generator=torch.Generator().manual_seed(batch)).cuda()
        ref = x.double().cpu() @ gemv_q8.dequantize(p).double().cpu().t()
        got = gemv_q8.gemv(x.bfloat16(), p).double().cpu()
        nmse = float(((got - ref) ** 2).sum() / (ref ** 2).sum())
        assert got.shape == (batch, n_rows) and nmse < 5e-4, (batch, nmse)


@pytest.mark.gpu
@pytest.mark.parametrize("qt", [QType.Q4_0, QType.Q5_1, QType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(14336, 4096), (300, 576)], ids=str)
def test_gemv_glu_fused_activation(qt, shape):
    """The FFN's gate|up GEMV with SwiGLU in its epilogue (gemv_glu): against float64 on the
    dequantized weight, and against the plain GEMV + activation kernel it replaces."""
    from lstream.backends.cuda import decode_kernels as dk
    n_ffn, n_cols = shape
    p = repack.repack(torch.from_numpy(_blocks(qt, 2 * n_ffn, n_cols, 6)).cuda(), qt, 2 * n_ffn, n_cols)
    for batch in (1, 3, 8):
        x = torch.randn(batch, n_cols, generator=torch.Generator().manual_seed(batch))
        x[:, 5] = 300.0  # an outlier feature
        x = x.cuda().bfloat16()
        gu = x.double().cpu() @ gemv_q8.dequantize(p).double().cpu().t()
        ref = torch.nn.functional.silu(gu[:, :n_ffn]) * gu[:, n_ffn:]
        got = gemv_q8.gemv_glu(x, p, n_ffn, torch.float32)
        assert got is not None and got.shape == (batch, n_ffn) and got.dtype == torch.float32
        nmse = float(((got.double().cpu() - ref) ** 2).sum() / (ref ** 2).sum())
        # two int8-activation dot products multiplied: about twice the plain GEMV's 5e-4 (the H200
        # measured 1.29e-3 for Q5_1 at 300 x 576, batch 3)
        assert nmse < 2e-3, (batch, nmse)
        y = gemv_q8.gemv(x, p)
        two = dk.act(y[:, :n_ffn], y[:, n_ffn:], False, torch.bfloat16)
        one = gemv_q8.gemv_glu(x, p, n_ffn, torch.bfloat16)
        assert torch.allclose(one.float(), two.float(), rtol=2e-2, atol=1e-3 * float(two.float().abs().max()))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_kernel_bit_exact(dev, qt):
    """The repacked layout's dequantization (prefill of resident weights) equals gguf's, fp32."""
    import gguf
    raw = _blocks(qt, 40, 512, 6)
    p = repack.repack(torch.from_numpy(raw).to(dev), qt, 40, 512)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(qt))).astype(np.float32)
    assert np.array_equal(gemv_q8.dequantize(p, torch.float32).cpu().numpy(), ref)
