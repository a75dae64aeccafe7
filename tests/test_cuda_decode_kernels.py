"""The fused decode kernels (backends/cuda/decode_kernels.py) against plain torch in fp32/fp64.

On a GPU (marker gpu) and, with triton installed and TRITON_INTERPRET=1, on the CPU through the
Triton interpreter. Tolerances: normalized MSE 1e-10 for fp32 outputs, 5e-5 for outputs rounded
to bf16 (8-bit mantissa: ~1e-5 from rounding alone), 1e-4 for attention (q.k and p.v in bf16 on tensor cores, as flash attention)."""
from __future__ import annotations

import os

import pytest
import torch

from lstream.backends.cuda import decode_kernels as dk
from lstream.backends.cuda.norm_rope import rope

INTERPRET = dk.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton interpreter not enabled"))]


def _nmse(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("dev", DEVICES)
def test_add_rms_norm(dev):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 640, generator=g) * 300).to(dev)
    big = (torch.randn(3, 900, generator=g) * 50).to(dev)
    h = big[:, 100:740]  # a column slice: rows strided like a stacked matmul's output
    w = torch.rand(640, generator=g).to(dev)
    s, y = dk.add_rms_norm(x, h, w, 1e-6, torch.bfloat16)
    rs = x.double() + h.double()
    ry = rs * torch.rsqrt(rs.square().mean(-1, keepdim=True) + 1e-6) * w.double()
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert _nmse(s, rs) < 1e-10 and _nmse(y, ry) < 5e-5


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("gelu", [False, True])
def test_act(dev, gelu):
    gen = torch.Generator().manual_seed(2)
    gu = (torch.randn(2, 2 * 1500, generator=gen) * 4).to(dev)
    g, u = gu[:, :1500], gu[:, 1500:]
    y = dk.act(g, u, gelu, torch.float32)
    gd = g.double()
    ref = (torch.nn.functional.gelu(gd, approximate="tanh") if gelu else torch.nn.functional.silu(gd)) * u.double()
    assert _nmse(y, ref) < 1e-10


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("neox,n_rot", [(False, 64), (True, 64), (True, 32), (False, 48)])
def test_rope_store(dev, neox, n_rot):
    gen = torch.Generator().manual_seed(3)
    t, n_head, n_kv, hd, n_ctx = 2, 4, 2, 64, 32
    qkv = torch.randn(t, (n_head + 2 * n_kv) * hd, generator=gen).to(dev)
    q, k, v = qkv[:, :n_head * hd], qkv[:, n_head * hd:(n_head + n_kv) * hd], qkv[:, (n_head + n_kv) * hd:]
    pos = torch.tensor([7, 20], device=dev)
    ang = pos.double()[:, None] * (10000.0 ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)).to(dev)
    cos, sin = ang.cos().float(), ang.sin().float()
    kc = torch.zeros(n_ctx, n_kv, hd, dtype=torch.bfloat16, device=dev)
    vc = torch.zeros_like(kc)
    qo = dk.rope_store(q, k, v, cos, sin, pos, kc, vc, n_head, n_kv, hd, n_rot, neox)
    rq = rope(q.contiguous().cpu(), cos.cpu(), sin.cpu(), n_head, hd, n_rot, neox, torch.float32, False)
    rk = rope(k.contiguous().cpu(), cos.cpu(), sin.cpu(), n_kv, hd, n_rot, neox, torch.float32, False)
    assert _nmse(qo.reshape(t, -1), rq) < 1e-10
    assert _nmse(kc[pos].reshape(t, -1).float(), rk) < 5e-5
    assert _nmse(vc[pos].reshape(t, -1).float(), v) < 5e-5
    others = torch.ones(n_ctx, dtype=torch.bool)
    others[pos.cpu()] = False
    assert not kc.cpu()[others].any() and not vc.cpu()[others].any()  # nothing else written


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("neox,n_rot,g,window,pos,n_ctx", [(False, 64, 4, 0, 150, 320), (True, 32, 2, 40, 97, 320),
                                                           (True, 64, 1, 0, 0, 320), (False, 64, 4, 0, 4100, 4200)])
def test_rope_attention_one_launch(dev, neox, n_rot, g, window, pos, n_ctx):
    """One token's RoPE, K/V write and attention in the split launch (rope_attention) against
    rope_store + attention: the same output, the same cache rows written, nothing else; several
    tokens are refused (None)."""
    gen = torch.Generator().manual_seed(6)
    n_kv, hd = 2, 64
    n_head = n_kv * g
    qkv = torch.randn(1, (n_head + 2 * n_kv) * hd, generator=gen).to(dev)
    q, k, v = qkv[:, :n_head * hd], qkv[:, n_head * hd:(n_head + n_kv) * hd], qkv[:, (n_head + n_kv) * hd:]
    p = torch.tensor([pos], device=dev)
    ang = p.double()[:, None] * (10000.0 ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)).to(dev)
    cos, sin = ang.cos().float(), ang.sin().float()
    kc = torch.randn(n_ctx, n_kv, hd, generator=gen).to(torch.bfloat16).to(dev)
    vc = torch.randn(n_ctx, n_kv, hd, generator=gen).to(torch.bfloat16).to(dev)
    kc0, vc0, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    got = dk.rope_attention(q, k, v, cos, sin, p, kc, vc, hd ** -0.5, window, n_head, n_kv, hd, n_rot, neox,
                            torch.float32)
    qo = dk.rope_store(q, k, v, cos, sin, p, kc2, vc2, n_head, n_kv, hd, n_rot, neox)
    ref = dk.attention(qo, kc2, vc2, p, hd ** -0.5, window, n_head, n_kv, torch.float32)
    assert got is not None and got.shape == ref.shape
    assert _nmse(kc[pos], kc2[pos]) < 5e-5 and torch.equal(vc[pos], vc2[pos])
    others = torch.arange(n_ctx, device=dev) != pos
    assert torch.equal(kc[others], kc0[others]) and torch.equal(vc[others], vc0[others])  # nothing else written
    assert _nmse(got, ref) < 1e-5
    two = torch.cat([qkv, qkv])
    assert dk.rope_attention(two[:, :n_head * hd], two, two, cos, sin, p, kc, vc, 1.0, 0, n_head, n_kv, hd, n_rot,
                             neox, torch.float32) is None


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("g,window,positions,n_ctx", [(4, 0, [150, 151], 320), (1, 0, [0], 320), (2, 40, [97], 320),
                                                     (8, 0, [300], 320), (4, 0, [4100, 30], 4200)])
def test_attention(dev, g, window, positions, n_ctx):
    """n_ctx 4200: 64 splits (n_splits_for), a deep position and a shallow one in one call."""
    gen = torch.Generator().manual_seed(4)
    n_kv, hd = 2, 64
    n_head = n_kv * g
    kc = (torch.randn(n_ctx, n_kv, hd, generator=gen)).to(torch.bfloat16).to(dev)
    vc = (torch.randn(n_ctx, n_kv, hd, generator=gen)).to(torch.bfloat16).to(dev)
    pos = torch.tensor(positions, device=dev)
    qo = (torch.randn(len(positions), n_head, hd, generator=gen) * 2).to(dev)
    out = dk.attention(qo, kc, vc, pos, hd ** -0.5, window, n_head, n_kv, torch.float32)
    ref = dk.attention_reference(qo.cpu().double(), kc.cpu().double(), vc.cpu().double(), pos.cpu(), hd ** -0.5,
                                 window, n_kv)
    assert out.shape == (len(positions), n_head * hd)
    assert _nmse(out, ref) < 1e-4


@pytest.mark.parametrize("dev", DEVICES)
def test_attention_fused_combine(dev, monkeypatch):
    """The last program of each (token, kv head) combines the splits (a counter, zero again after
    every launch): the same output as the separate combine launch, launch after launch."""
    gen = torch.Generator().manual_seed(6)
    n_kv, g, hd, n_ctx = 2, 4, 64, 320
    kc = torch.randn(n_ctx, n_kv, hd, generator=gen).to(torch.bfloat16).to(dev)
    vc = torch.randn(n_ctx, n_kv, hd, generator=gen).to(torch.bfloat16).to(dev)
    pos = torch.tensor([200, 7, 0], device=dev)
    qo = (torch.randn(3, n_kv * g, hd, generator=gen) * 2).to(dev)
    args = (qo, kc, vc, pos, hd ** -0.5, 0, n_kv * g, n_kv, torch.float32)
    monkeypatch.setenv("LSTREAM_ATTN_FUSED", "1")
    fused = [dk.attention(*args) for _ in range(3)]
    assert not dk._counters(qo.device).any()
    monkeypatch.setenv("LSTREAM_ATTN_FUSED", "0")
    two = dk.attention(*args)
    for f in fused:
        assert torch.allclose(f, two, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [0, 5])
def test_static_attention_fallback_matches(window):
    """Where the split-K kernel fails its self-check, a static step's attention takes SDPA over the
    whole cache under a position mask: the same function (CPU tensors, fp32)."""
    import types

    from lstream.backends.cuda.attention import AttentionMixin, DeviceKV

    class Fallback(AttentionMixin):
        dtype, device, decode_kernels, use_triton = torch.float32, torch.device("cpu"), False, False

    g = torch.Generator().manual_seed(6)
    n_kv, hd, n_head = 2, 64, 8
    store = DeviceKV(torch.randn(50, n_kv, hd, generator=g), torch.randn(50, n_kv, hd, generator=g))
    si = types.SimpleNamespace(positions=torch.tensor([20, 21]), cache={})
    q = torch.randn(2, n_head * hd, generator=g)
    k, v = torch.randn(2, n_kv, hd, generator=g), torch.randn(2, n_kv, hd, generator=g)
    p = dict(n_head=n_head, n_head_kv=n_kv, head_dim=hd, scale=hd ** -0.5, window=window)
    out = Fallback()._attention_static(q, k, v, store, p, si)
    ref = dk.attention_reference(q.reshape(2, n_head, hd), store.k, store.v, si.positions, hd ** -0.5, window, n_kv)
    assert _nmse(out, ref) < 1e-10


@pytest.mark.gpu
def test_selfcheck_passes_on_this_gpu():
    """The backend's self-check (backends/cuda/selfcheck.py) accepts the new kernels on the GPU; the
    int8 GEMV is correct here, and used exactly when it was timed faster than the GGUF-block GEMV."""
    from lstream.backends.cuda import selfcheck
    dev = torch.device("cuda")
    ok = selfcheck.kernels_ok(dev)
    assert ok["decode"] and ok["prefill"] and selfcheck._gemv_q8(dev)
    t = selfcheck.TIMES[str(dev)]
    assert ok["gemv_q8"] == (t["gemv_q8"] < t["gemv"])


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter not enabled")
def test_selfcheck_passes_in_the_interpreter():
    """The self-check's own cases run through the kernels here (kernels_ok skips them off a GPU):
    a wrong check would otherwise only show on the GPU machine, as the older path taken there."""
    from lstream.backends.cuda import selfcheck
    cpu = torch.device("cpu")
    assert all(fn(cpu) for fn in selfcheck.CHECKS.values())
