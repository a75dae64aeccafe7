"""Prefill attention by device-side positions (backends/cuda/prefill_attention.py) against a
float64 softmax over each query's keys, on a GPU (marker gpu) and in the Triton interpreter.
Tolerance: normalized MSE 1e-4 (q.k and p.v in bf16 on tensor cores, as flash attention)."""
from __future__ import annotations

import os

import pytest
import torch

from lstream.backends.cuda import prefill_attention as pa

INTERPRET = pa.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton interpreter not enabled"))]


def _reference(q, kc, vc, positions, scale, window, n_head, n_kv):
    t, hd = q.shape[0], kc.shape[-1]
    g = n_head // n_kv
    out = torch.empty(t, n_head * hd, dtype=torch.float64)
    for i, p in enumerate(positions.tolist()):
        lo = max(p - window + 1, 0) if window else 0
        k = kc[lo:p + 1].double().repeat_interleave(g, dim=1)
        v = vc[lo:p + 1].double().repeat_interleave(g, dim=1)
        s = torch.einsum("hd,shd->hs", q[i].double().reshape(n_head, hd), k) * scale
        out[i] = torch.einsum("hs,shd->hd", torch.softmax(s, -1), v).reshape(-1)
    return out


def _nmse(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("t,n_past,n_ctx,g,window", [
    (70, 0, 96, 4, 0),      # a first ubatch: causal within it, a partial query block
    (40, 150, 256, 2, 0),   # after cached tokens, a partial last key block
    (64, 30, 128, 1, 16),   # a sliding layer (Gemma's local attention)
])
def test_prefill_attention(dev, t, n_past, n_ctx, g, window):
    gen = torch.Generator().manual_seed(t + n_past)
    n_kv, hd = 2, 32
    n_head = n_kv * g
    kc = (torch.randn(n_ctx, n_kv, hd, generator=gen) * 2).to(torch.bfloat16)
    vc = torch.randn(n_ctx, n_kv, hd, generator=gen).to(torch.bfloat16)
    q = torch.randn(t, n_head * hd, generator=gen) * 2
    pos = torch.arange(n_past, n_past + t)
    ref = _reference(q, kc, vc, pos, hd ** -0.5, window, n_head, n_kv)
    y = pa.prefill_attention(q.to(dev), kc.to(dev), vc.to(dev), pos.to(dev), hd ** -0.5, window, n_head, n_kv,
                             torch.float32)
    assert y.shape == (t, n_head * hd) and y.dtype == torch.float32
    assert _nmse(y, ref) < 1e-4


@pytest.mark.parametrize("window", [0, 16])
def test_reference_matches(window):
    """The no-Triton fallback (SDPA over the whole cache, masked) is the same function."""
    gen = torch.Generator().manual_seed(5)
    kc, vc = torch.randn(80, 2, 16, generator=gen), torch.randn(80, 2, 16, generator=gen)
    q = torch.randn(20, 4 * 16, generator=gen)
    pos = torch.arange(33, 53)
    y = pa.prefill_attention(q, kc, vc, pos, 0.25, window, 4, 2, torch.float32, use_triton=False)
    assert _nmse(y, _reference(q, kc, vc, pos, 0.25, window, 4, 2)) < 1e-10
