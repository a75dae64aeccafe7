"""Attention over the paged K/V cache (core/paged_kv.py) on the CUDA backend: a ubatch whose tokens
belong to several sequences (continuous batching). Each token's K/V go to its slot; each token then
attends to its own sequence's positions [lo, pos_t], read through the block table, by a split-K
flash-decoding kernel (the paged form of decode_kernels._k_attn_split, combined by the same
_k_attn_combine). A layer whose K/V live in host memory (a streamed layer whose attention the
policy sent here) has its new K/V written there and the rows it reads gathered and uploaded.
Without Triton (the CPU, or TRITON_INTERPRET unset) attention_paged_reference computes the same
function in torch."""
from __future__ import annotations

import numpy as np
import torch

from . import decode_kernels as dk
from .attention import DeviceKV
from .dequant import HAVE_TRITON, tl, triton, triton_usable

if HAVE_TRITON:

    @triton.jit
    def _k_paged_split(q_ptr, kc_ptr, vc_ptr, pos_ptr, seq_ptr, tab_ptr, TAB_W, po_ptr, pm_ptr, pl_ptr, scale,
                       window, n_head, n_kv, BS, G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr,
                       BN: tl.constexpr, NS: tl.constexpr, BF16_DOT: tl.constexpr):
        """Program (kv head, split, t): the G query heads of one kv head over one split of token
        t's keys; key position s of t's sequence is slot table[seq_t, s // BS] * BS + s % BS."""
        DT: tl.constexpr = tl.bfloat16 if BF16_DOT else tl.float32
        kvh = tl.program_id(0)
        sp = tl.program_id(1)
        t = tl.program_id(2).to(tl.int64)
        p = tl.load(pos_ptr + t).to(tl.int32)
        row = tl.load(seq_ptr + t).to(tl.int64)
        lo = tl.where(window > 0, tl.maximum(p - window + 1, 0), 0)
        n = p + 1 - lo
        chunk = tl.cdiv(tl.cdiv(n, NS), BN) * BN
        start = lo + sp * chunk
        end = tl.minimum(start + chunk, p + 1)
        g = tl.arange(0, GP)
        d = tl.arange(0, HD)
        gm = g < G
        heads = kvh * G + g
        q = tl.load(q_ptr + (t * n_head + heads[:, None]) * HD + d[None, :], mask=gm[:, None], other=0.0)
        q = (q * scale).to(DT)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HD], tl.float32)
        kb = start
        while kb < end:
            kidx = kb + tl.arange(0, BN)
            km = kidx < end
            blk = tl.load(tab_ptr + row * TAB_W + kidx // BS, mask=km, other=0).to(tl.int64)
            slot = blk * BS + kidx % BS
            off = (slot[:, None] * n_kv + kvh) * HD + d[None, :]
            kt = tl.load(kc_ptr + off, mask=km[:, None], other=0.0).to(DT)
            sc = tl.dot(q, tl.trans(kt))
            sc = tl.where(km[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            vt = tl.load(vc_ptr + off, mask=km[:, None], other=0.0).to(DT)
            acc = acc * alpha[:, None] + tl.dot(pr.to(DT), vt)
            m_i = m_new
            kb += BN
        slot_o = (t * n_head + heads) * NS + sp
        tl.store(pm_ptr + slot_o, m_i, mask=gm)
        tl.store(pl_ptr + slot_o, l_i, mask=gm)
        tl.store(po_ptr + slot_o[:, None] * HD + d[None, :], acc, mask=gm[:, None])


def paged_attention(qo, k_cache, v_cache, tables, seq, positions, block_size: int, scale: float, window: int,
                    n_head: int, n_kv: int, dtype: torch.dtype, n_splits: int = dk.N_SPLITS,
                    use_triton: bool | None = None) -> torch.Tensor:
    """qo (T, n_head, hd) fp32; caches (slots, n_kv, hd); tables (S, W) int32, seq (T,) int32 and
    positions (T,) int64 on qo's device. Returns (T, n_head * hd) in `dtype`."""
    t, _, hd = qo.shape
    g = n_head // n_kv
    use = triton_usable(qo) if use_triton is None else (use_triton and HAVE_TRITON)
    if use and hd >= 16 and hd == triton.next_power_of_2(hd):
        po = torch.empty((t, n_head, n_splits, hd), dtype=torch.float32, device=qo.device)
        pm = torch.empty((t, n_head, n_splits), dtype=torch.float32, device=qo.device)
        pl = torch.empty_like(pm)
        _k_paged_split[(n_kv, n_splits, t)](qo, k_cache, v_cache, positions, seq, tables, tables.shape[1], po, pm,
                                            pl, scale, int(window or 0), n_head, n_kv, block_size, G=g,
                                            GP=max(16, triton.next_power_of_2(g)), HD=hd, BN=32, NS=n_splits,
                                            BF16_DOT=qo.is_cuda, num_warps=4)
        out = torch.empty((t, n_head * hd), dtype=dtype, device=qo.device)
        dk._k_attn_combine[(t, n_head)](po, pm, pl, out, n_head, HD=hd, NS=n_splits, num_warps=4)
        return out
    return paged_attention_reference(qo, k_cache, v_cache, tables, seq, positions, block_size, scale, window,
                                     n_kv).to(dtype)


def paged_attention_reference(qo, k_cache, v_cache, tables, seq, positions, block_size: int, scale: float,
                              window: int, n_kv: int) -> torch.Tensor:
    """The same function in plain torch, token by token."""
    t, n_head, hd = qo.shape
    g = n_head // n_kv
    outs = []
    for i in range(t):
        p, row = int(positions[i]), int(seq[i])
        lo = max(p - int(window) + 1, 0) if window else 0
        pos = torch.arange(lo, p + 1, device=qo.device)
        slots = tables[row].long()[pos // block_size] * block_size + pos % block_size
        keys = k_cache[slots].float().repeat_interleave(g, dim=1)
        vals = v_cache[slots].float().repeat_interleave(g, dim=1)
        s = torch.einsum("hd,shd->hs", qo[i].float(), keys) * scale
        outs.append(torch.einsum("hs,shd->hd", torch.softmax(s, dim=-1), vals).reshape(-1))
    return torch.stack(outs)


def batch_tensors(backend, batch, positions) -> dict:
    """The ubatch's slots, sequence rows, positions, tables and logits rows on the device, once."""
    c = batch.cache.get(backend.name)
    if c is None:
        dev = backend.device
        c = batch.cache[backend.name] = {
            "slots": torch.from_numpy(np.asarray(batch.slots, dtype=np.int64)).to(dev),
            "seq": torch.from_numpy(np.asarray(batch.seq, dtype=np.int32)).to(dev),
            "pos": torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(dev),
            "tables": torch.from_numpy(np.ascontiguousarray(batch.tables, dtype=np.int32)).to(dev),
            "rows": None if batch.out_rows is None else torch.from_numpy(
                np.asarray(batch.out_rows, dtype=np.int64)).to(dev)}
    return c


def attention_paged(backend, node, inputs, ctx) -> torch.Tensor:
    """Op.ATTENTION of a ubatch of several sequences (ctx.batch) on the CUDA backend."""
    q, k, v = inputs
    p = node.params
    t, n_head, n_kv, hd = q.shape[0], p["n_head"], p["n_head_kv"], p["head_dim"]
    b = ctx.batch
    c = batch_tensors(backend, b, ctx.positions)
    store = ctx.kv.layers[node.layer]
    k = k.to(backend.dtype).reshape(t, n_kv, hd)
    v = v.to(backend.dtype).reshape(t, n_kv, hd)
    qo = q.float().reshape(t, n_head, hd).contiguous()  # the kernel reads it densely
    window = int(p.get("window", 0) or 0)
    if isinstance(store, DeviceKV):
        store.k.index_copy_(0, c["slots"], k)
        store.v.index_copy_(0, c["slots"], v)
        return paged_attention(qo, store.k, store.v, c["tables"], c["seq"], c["pos"], b.block_size, p["scale"],
                               window, n_head, n_kv, backend.dtype, use_triton=backend.use_triton)
    # a host layer: its new K/V into host memory, then the rows each sequence reads, uploaded as a
    # compact cache with one slot per position (block size 1)
    backend.synchronize()
    store.k[b.slots] = k.float().cpu().numpy()
    store.v[b.slots] = v.float().cpu().numpy()
    pos = np.asarray(ctx.positions, dtype=np.int64)
    n_seq = b.tables.shape[0]
    lens = np.zeros(n_seq, np.int64)
    np.maximum.at(lens, b.seq, pos + 1)
    offs = np.concatenate([[0], np.cumsum(lens)[:-1]])
    width = int(lens.max())
    table = np.zeros((n_seq, width), np.int32)
    gather = []
    for s in range(n_seq):
        ps = np.arange(lens[s])
        gather.append(b.tables[s, ps // b.block_size].astype(np.int64) * b.block_size + ps % b.block_size)
        table[s, :lens[s]] = offs[s] + ps
    idx = np.concatenate(gather)
    kc = torch.from_numpy(store.k[idx]).to(backend.device).to(backend.dtype)
    vc = torch.from_numpy(store.v[idx]).to(backend.device).to(backend.dtype)
    tab = torch.from_numpy(table).to(backend.device)
    return paged_attention(qo, kc, vc, tab, c["seq"], c["pos"], 1, p["scale"], window, n_head, n_kv, backend.dtype,
                           use_triton=backend.use_triton)
