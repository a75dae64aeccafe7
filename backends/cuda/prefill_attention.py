"""Prefill attention that reads each query's position on the device (flash attention, causal by
position, grouped heads): a ubatch's step captured as a CUDA graph then serves every depth, as the
decode step's does (core/replay.py). cuDNN's SDPA takes the span from the tensor shapes, so a
graph of it would hold for one depth only.

One program per (block of BM queries, query head): it walks the key blocks from the window's start
(0 without a window) up to its last query's position, q.k and p.v on tensor cores in bf16, the
online softmax in fp32. Without Triton, the same function by SDPA over the whole cache, masked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dequant import HAVE_TRITON, tl, triton, triton_usable
from .fast_launch import launcher

LOG2E = 1.4426950408889634

if HAVE_TRITON:

    @triton.jit
    def _block(q, k_ptr, v_ptr, qpos, start, N_CTX, window, SKT, kvh, m_i, l_i, acc,
               DT: tl.constexpr, HD: tl.constexpr, BN: tl.constexpr, WINDOW: tl.constexpr):
        """One key block of the online softmax: (m, l, acc) updated."""
        d = tl.arange(0, HD)
        cols = start + tl.arange(0, BN)
        cm = cols < N_CTX
        k = tl.load(k_ptr + cols[None, :] * SKT + kvh * HD + d[:, None], mask=cm[None, :], other=0.0)
        s = tl.dot(q, k.to(DT))
        ok = (cols[None, :] <= qpos[:, None]) & cm[None, :]
        if WINDOW:
            ok = ok & (cols[None, :] > qpos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet (padding)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + cols[:, None] * SKT + kvh * HD + d[None, :], mask=cm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v.to(DT))
        return m_new, l_i, acc

    @triton.jit
    def _k_prefill_attn(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, T, N_CTX, scale2, window,
                        SQ, SKT, SOT, BF16_DOT: tl.constexpr, G: tl.constexpr, HD: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, WINDOW: tl.constexpr):
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // G
        rows = pid_m * BM + tl.arange(0, BM)
        rm = rows < T
        qpos = tl.load(pos_ptr + rows, mask=rm, other=-1)
        # positions ascend within a ubatch: the block's keys end at its last query's position
        hi = tl.load(pos_ptr + tl.minimum(pid_m * BM + BM, T) - 1) + 1
        lo = 0
        if WINDOW:
            lo = tl.maximum(tl.load(pos_ptr + pid_m * BM) - window + 1, 0) // BN * BN
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + rows[:, None] * SQ + h * HD + d[None, :], mask=rm[:, None], other=0.0)
        DT: tl.constexpr = tl.bfloat16 if BF16_DOT else tl.float32  # (the interpreter's bf16 dot is wrong)
        q = (q.to(tl.float32) * scale2).to(DT)  # scale and log2(e) folded in: exp2 below
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, HD), tl.float32)
        if BF16_DOT:  # a GPU: a for loop, which Triton software-pipelines
            for start in range(lo, hi, BN):
                m_i, l_i, acc = _block(q, k_ptr, v_ptr, qpos, start, N_CTX, window, SKT, kvh, m_i, l_i, acc,
                                       DT, HD, BN, WINDOW)
        else:  # the interpreter takes runtime loop bounds only in a while loop
            start = lo
            while start < hi:
                m_i, l_i, acc = _block(q, k_ptr, v_ptr, qpos, start, N_CTX, window, SKT, kvh, m_i, l_i, acc,
                                       DT, HD, BN, WINDOW)
                start += BN
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + rows[:, None] * SOT + h * HD + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rm[:, None])


def supported(head_dim: int) -> bool:
    """Head sizes the kernel takes (proven at backend start with 64; up to 128 the tiles fit shared
    memory at the launch shapes below). Others (Gemma 3's 256) keep SDPA eagerly, no graphs."""
    return 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                      scale: float, window: int, n_head: int, n_kv: int, dtype: torch.dtype,
                      use_triton: bool | None = None) -> torch.Tensor:
    """Causal GQA of q (T, n_head * hd) at ascending positions (T,) int64 (on the device) over the cache rows
    [lo, pos_t] (lo = pos_t - window + 1 for a sliding layer); the K/V of the T tokens must be in
    the caches (n_ctx, n_kv, hd) already. Returns (T, n_head * hd) in `dtype`."""
    t = q.shape[0]
    n_ctx, _, hd = k_cache.shape
    use = triton_usable(q) if use_triton is None else (use_triton and HAVE_TRITON)
    if use and supported(hd) and k_cache.is_contiguous() and v_cache.is_contiguous():
        q = q.contiguous()
        out = torch.empty((t, n_head * hd), dtype=dtype, device=q.device)
        bm = 64 if t <= 64 else 128
        launcher(_k_prefill_attn)((triton.cdiv(t, bm), n_head),
            q, k_cache, v_cache, positions, out, t, n_ctx, float(scale) * LOG2E, int(window or 0),
            q.stride(0), n_kv * hd, n_head * hd, BF16_DOT=q.is_cuda, G=n_head // n_kv, HD=hd, BM=bm, BN=64,
            WINDOW=bool(window), num_warps=8 if bm == 128 else 4, num_stages=2)
        return out
    return prefill_attention_reference(q, k_cache, v_cache, positions, scale, window, n_head, n_kv).to(dtype)


def prefill_attention_reference(q, k_cache, v_cache, positions, scale: float, window: int, n_head: int,
                                n_kv: int) -> torch.Tensor:
    """The same function by SDPA over the whole cache, masked by position (tests, no Triton)."""
    t = q.shape[0]
    n_ctx, _, hd = k_cache.shape
    g = n_head // n_kv
    kpos = torch.arange(n_ctx, device=q.device)[None, :]
    qpos = positions[:, None]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    qh = q.float().reshape(t, n_kv, g, hd).permute(1, 2, 0, 3).reshape(1, n_kv, g * t, hd)
    o = F.scaled_dot_product_attention(qh, k_cache.float().transpose(0, 1).unsqueeze(0),
                                       v_cache.float().transpose(0, 1).unsqueeze(0),
                                       attn_mask=mask.repeat(g, 1)[None, None], scale=scale)
    return o.reshape(n_kv, g, t, hd).permute(2, 0, 1, 3).reshape(t, n_head * hd)
