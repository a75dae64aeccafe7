"""Expert matmuls of a MoE layer with the experts resident: one launch per matmul for all experts.

The experts of a tensor are one (n_expert * rows, cols) weight (GGUF blocks or repack.Packed): expert
e's row r is row e * rows + r, so a program finds its expert's rows from the router's top-k ids on
the device: no host sync, no per-expert launch, and a decode step stays capturable in a CUDA graph.
Gate and up are stacked per expert (expert e: gate rows, then up rows), so one launch reads both.
The weights are decoded by qgemm's tile loaders (qgemm._w_q32/_w_k45/_w_q6k, and qgemm._step for the
grouped GEMM), in every format qgemm reads; nothing about the block layouts is written again here.

Decode (a few tokens): GEMVs over the selected experts' rows.
  gate_up: program (pair p = token * top_k + slot, tile of BN rows): h[p] = silu(x[t] Wg^T) * (x[t] Wu^T)
  down:    program (pair p, tile): y[p] = w[p] * h[p] Wd(ids[p])^T (the routing weight fused), then
           the sum over the top k in torch (deterministic, no atomics; T x k x dim floats).
  Each program keeps a [BN, BK] fp32 accumulator and sums it once at the end (one cross-thread sum).
Prefill: the (token, slot) pairs sorted by expert on the device (argsort; counts by scatter_add,
as torch.bincount syncs on CUDA), a tile table of (expert, first pair, end) made with cumsum and
searchsorted over a fixed upper bound of tiles (P // BM + min(E, P)): programs past the real tiles
exit. One grouped GEMM launch then walks (tile, n-tile) with qgemm's fused dequant + tl.dot step,
its x rows gathered by token.

Without a GPU (or the interpreter) everything has a torch fallback on the same operands (the fake
device in the tests): dequantize the used experts, multiply in fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.qtypes import QType
from . import dequant as ck
from . import gemv_q8, moe_q8
from . import qgemm as qg
from .dequant import HAVE_TRITON, tl, triton
from .fast_launch import launcher
from .repack import Packed

TYPES = qg.TYPES


@dataclass
class Experts:
    """One expert tensor on the device: w holds n_expert * n_rows rows of n_cols (blocks or Packed)."""
    qtype: QType
    n_expert: int
    n_rows: int  # rows per expert (gate|up stacked: 2 * ffn)
    n_cols: int
    w: object  # uint8 (n_expert * n_rows, row bytes) GGUF blocks, or a repack.Packed of as many rows

    def __post_init__(self):
        self.ops = qg._operands(self.w, self.qtype, self.n_expert * self.n_rows, self.n_cols)

    def dequant(self, e: int) -> torch.Tensor:
        """Expert e as (n_rows, n_cols) fp32 (the torch fallback)."""
        r0, r1 = e * self.n_rows, (e + 1) * self.n_rows
        if isinstance(self.w, Packed):
            return gemv_q8._dequantize_torch(self.w.rows(r0, r1))
        return ck.dequantize(self.w[r0:r1], self.qtype, self.n_cols, dtype=torch.float32, use_triton=False)


def use_kernels(x: torch.Tensor) -> bool:
    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if HAVE_TRITON:

    @triton.jit
    def _rowsum(acc):
        """acc.sum(1): tl.sum's own reduction, written out because tl.sum is a library jit function that
        the tests' interpreter (patched in after import) cannot call; with this combine function the
        interpreter sums in numpy."""
        return tl.reduce(acc, 1, tl.standard._sum_combine)

    @triton.jit
    def _w_tile(q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0, MAGIC, FMT: tl.constexpr, TS: tl.constexpr,
                BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
        """W's [BN, BK] fp32 tile of rows `rows` at column k0, by qgemm's loader for the format (as qgemm._step)."""
        if FMT <= 1:
            w = qg._w_q32(q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0 // 32, MAGIC, BN, BK, FMT, TS, BITS, OFF,
                          HAS_MIN, QH, QS)
        elif FMT == 2:
            w = qg._w_k45(q_ptr, h_ptr, b_ptr, rows, RS, k0, MAGIC, BN, BK, TS, QH >= 0)
        else:
            w = qg._w_q6k(q_ptr, h_ptr, b_ptr, rows, RS, k0, MAGIC, BN)
        return w

    @triton.jit
    def _k_gate_up(x_ptr, ids_ptr, q_ptr, h_ptr, b_ptr, e_ptr, uq_ptr, uh_ptr, ub_ptr, ue_ptr, out_ptr, N, RS, HS,
                   MAGIC, KTOP: tl.constexpr, K: tl.constexpr, FMT: tl.constexpr, TS: tl.constexpr,
                   BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr,
                   SEP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Program (pair p, row tile): N = ffn rows; the expert's gate rows are e*2N.., up rows e*2N+N..
        (stacked), or with SEP gate and up in two tensors (u*_ptr: a slot of streamed experts), rows e*N.."""
        p = tl.program_id(0)
        e = tl.load(ids_ptr + p).to(tl.int64)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        if SEP:
            rg = e * N + tl.minimum(rn, N - 1).to(tl.int64)  # clamped: no load masks
            ru = rg
        else:
            rg = e * (2 * N) + tl.minimum(rn, N - 1).to(tl.int64)
            ru = rg + N
        xr = x_ptr + (p // KTOP).to(tl.int64) * K + tl.arange(0, BK)
        ag = tl.full([BN, BK], 0.0, tl.float32)
        au = tl.full([BN, BK], 0.0, tl.float32)
        for k0 in range(0, K, BK):  # K constexpr: a plain range in the interpreter too
            x = tl.load(xr + k0).to(tl.float32)[None, :]
            ag += _w_tile(q_ptr, h_ptr, b_ptr, e_ptr, rg, RS, HS, k0, MAGIC, FMT, TS, BITS, OFF, HAS_MIN, QH,
                             QS, BN, BK) * x
            au += _w_tile(uq_ptr, uh_ptr, ub_ptr, ue_ptr, ru, RS, HS, k0, MAGIC, FMT, TS, BITS, OFF, HAS_MIN, QH,
                             QS, BN, BK) * x
        g = _rowsum(ag)
        u = _rowsum(au)
        e = tl.exp(-tl.abs(g))  # sigmoid without exp overflowing (inf is right, but numpy warns in tests)
        h = g * tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) * u
        tl.store(out_ptr + p.to(tl.int64) * N + rn, h.to(out_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _k_down(h_ptr, ids_ptr, wt_ptr, q_ptr, hs_ptr, b_ptr, e_ptr, out_ptr, N, RS, HS, MAGIC,
                K: tl.constexpr, FMT: tl.constexpr, TS: tl.constexpr, BITS: tl.constexpr,
                OFF: tl.constexpr, HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
        """Program (pair p, row tile): out[p, rows] = w[p] * h[p] . W(ids[p]) rows. Per pair, not per token
        looping over its top k: a token's down rows alone are too few programs to fill an H200."""
        p = tl.program_id(0).to(tl.int64)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rows = tl.load(ids_ptr + p).to(tl.int64) * N + tl.minimum(rn, N - 1).to(tl.int64)
        hr = h_ptr + p * K + tl.arange(0, BK)
        acc = tl.full([BN, BK], 0.0, tl.float32)
        for k0 in range(0, K, BK):
            x = tl.load(hr + k0).to(tl.float32)
            acc += _w_tile(q_ptr, hs_ptr, b_ptr, e_ptr, rows, RS, HS, k0, MAGIC, FMT, TS, BITS, OFF, HAS_MIN,
                              QH, QS, BN, BK) * x[None, :]
        y = _rowsum(acc) * tl.load(wt_ptr + p).to(tl.float32)
        tl.store(out_ptr + p * N + rn, y, mask=rn < N)

    @triton.jit
    def _k_grouped(x_ptr, src_ptr, te_ptr, tm_ptr, tend_ptr, q_ptr, h_ptr, b_ptr, e_ptr, out_ptr, N, RS, HS, MAGIC,
                   K: tl.constexpr, FMT: tl.constexpr, TS: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr,
                   HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr):
        """Program (n tile, tile i): out[m0:end, n tile] = x[src[m0:end]] @ W(expert te[i])^T; te < 0: no tile.
        Consecutive programs share a token tile (its x stays in L2) and walk that expert's rows."""
        i = tl.program_id(1)
        e = tl.load(te_ptr + i)
        if e >= 0:
            m0 = tl.load(tm_ptr + i)
            end = tl.load(tend_ptr + i)
            rm = m0 + tl.arange(0, BM)
            tok = tl.load(src_ptr + tl.minimum(rm, end - 1)).to(tl.int64)  # clamped: loads need no masks
            xr = x_ptr + tok[:, None] * K
            rn = tl.program_id(0) * BN + tl.arange(0, BN)
            rows = e.to(tl.int64) * N + tl.minimum(rn, N - 1).to(tl.int64)
            if SWAP:
                acc = tl.full([BN, BM], 0.0, tl.float32)
            else:
                acc = tl.full([BM, BN], 0.0, tl.float32)
            for k0 in range(0, K, BK):
                acc = qg._step(acc, xr, q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0, MAGIC, FMT, TS, BITS, OFF,
                               HAS_MIN, QH, QS, BN, BK, SWAP, INTERP)
            ro = rm.to(tl.int64)
            if SWAP:
                tl.store(out_ptr + ro[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty),
                         mask=(rm[None, :] < end) & (rn[:, None] < N))
            else:
                tl.store(out_ptr + ro[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                         mask=(rm[:, None] < end) & (rn[None, :] < N))


    @triton.jit
    def _vmax(v):  # tl.max(v, 0) written out, as _rowsum (the tests' interpreter)
        return tl.reduce(v, 0, tl.standard._elementwise_max)

    @triton.jit
    def _vmin(v):
        return tl.reduce(v, 0, tl.standard._elementwise_min)

    @triton.jit
    def _vsum(v):
        return tl.reduce(v, 0, tl.standard._sum_combine)

    @triton.jit
    def _k_route(l_ptr, ids_ptr, w_ptr, E, KTOP: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr,
                 BE: tl.constexpr):
        """Program t: token t's top-k experts by router logit (softmax is monotone: the same order as
        by probability), first index among equal ones, and their softmax probabilities in fp32,
        renormalized over the k when NORM (core/moe.py route, in one launch)."""
        t = tl.program_id(0)
        e = tl.arange(0, BE)
        z = tl.load(l_ptr + t * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
        p = tl.exp(z - _vmax(z))  # 0 past E
        kk = tl.arange(0, KP)
        iv = tl.full([KP], 0, tl.int64)  # (tl.zeros: a library jit function too)
        wv = tl.full([KP], 0.0, tl.float32)
        for j in tl.static_range(KTOP):
            # clamped: NaN logits (no maximum found) still give an expert id in range, never a wild read
            i = tl.minimum(_vmin(tl.where(z == _vmax(z), e, BE)), E - 1)
            iv = tl.where(kk == j, i, iv)
            wv = tl.where(kk == j, _vsum(tl.where(e == i, p, 0.0)), wv)
            z = tl.where(e == i, float("-inf"), z)
        if NORM:
            wv = wv / _vsum(wv)
        else:
            wv = wv / _vsum(p)
        tl.store(ids_ptr + t * KTOP + kk, iv, mask=kk < KTOP)
        tl.store(w_ptr + t * KTOP + kk, wv, mask=kk < KTOP)


def route(logits: torch.Tensor, top_k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, n_expert) -> ids (T, top_k) int64, weights (T, top_k) fp32, by decreasing probability:
    one launch instead of torch's softmax, top-k and renormalization (~6 per MoE layer and step)."""
    T, E = logits.shape
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    w = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    _launch(_k_route, (T,), logits.contiguous(), ids, w, E, KTOP=top_k, KP=triton.next_power_of_2(top_k),
            NORM=bool(norm), BE=triton.next_power_of_2(E), num_warps=1)  # (its reductions: warp shuffles, no shared memory)
    return ids, w


def _launch(kernel, grid, *args, **kw):
    if args[0].is_cuda:
        launcher(kernel)(grid, *args, **kw)
    else:  # the interpreter (tests): Triton's own path
        kernel[grid](*args, **kw)


def _magic(ex: Experts) -> int:
    return qg._ONE ^ (1 << 22) if ex.ops[3]["BITS"] == 8 else qg._ONE


def gemv_cfg(ex: Experts, n_out: int, programs_per_row: int) -> tuple[int, int, int]:
    """(BN rows, BK cols per step, warps) of a decode program: shape only (graph safe). BN: 16 rows,
    fewer (>= 4) while under ~8 programs per SM of an H200 (the MoE step is small: latency bound);
    BK: a [BN, BK] tile of ~2048 weights, 16 per thread (sm_90 builds, tools/moe_build.py: 5-7 SASS
    instructions per weight, 56-80 registers, no spills; 16 x 256 took 153), whole k steps of
    qgemm's format (Q6_K: 128)."""
    bn = 16
    # (repacked experts: tiles of 16 rows or more; a [4, 256] tile of them gave wrong sums on the H200, 2026-12-04)
    while bn > (16 if isinstance(ex.w, Packed) else 4) and programs_per_row * triton.cdiv(n_out, bn) < 1056:
        bn //= 2
    bk = qg._bk(128 if ex.qtype == QType.Q6_K else min(256, 2048 // bn), ex.qtype, ex.n_cols)
    return bn, bk, max(1, min(4, bn * bk // 256))  # >= 8 weights per thread (4 x 128 at 4 warps: 32 instr/weight)


def decode(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, gu: Experts, down: Experts,
           cfg=None, up: Experts | None = None, int8: bool = True) -> torch.Tensor:
    """The routed SwiGLU experts of T tokens: x (T, dim), ids/wts (T, top_k) -> (T, dim) fp32.
    Two kernel launches (gate|up with SiLU*up, weighted down) and the sum; any T, meant for a few tokens.
    gu: gate|up stacked per expert, or with `up` given the gate alone (a slot of streamed experts).
    Repacked experts on a GPU with Gluon: the int8 GEMVs of moe_q8.py unless int8=False (fp32 products)."""
    T, k = ids.shape
    ffn = gu.n_rows // 2 if up is None else gu.n_rows
    if not use_kernels(x):
        return _decode_torch(x, ids, wts, gu if up is None else _Stacked(gu, up), down)
    x = x.contiguous()
    ids = ids.contiguous()
    h = torch.empty((T * k, ffn), dtype=torch.float32, device=x.device)
    y = torch.empty((T * k, down.n_rows), dtype=torch.float32, device=x.device)
    if int8 and up is None and cfg is None and moe_q8.usable(x, gu.w) and moe_q8.usable(x, down.w):  # int8 dp4a GEMVs
        moe_q8.launch(x, ids, None, gu.w, gu.n_rows, ffn, h, k)
        moe_q8.launch(h, ids, wts.float().contiguous(), down.w, down.n_rows, down.n_rows, y, k)
        return y.view(T, k, -1).sum(dim=1)
    (q, hp, b, e), rs, hs, cx = gu.ops
    (uq, uh, ub, ue), urs, uhs, _ = (up or gu).ops
    assert (urs, uhs) == (rs, hs), "gate and up experts of one format and shape"
    bn, bk, nw = cfg[0] if cfg else gemv_cfg(gu, ffn, T * k)
    _launch(_k_gate_up, (T * k, triton.cdiv(ffn, bn)), x, ids, q, hp, b, e, uq, uh, ub, ue, h, ffn, rs, hs,
            _magic(gu), KTOP=k, K=gu.n_cols, **cx, SEP=up is not None, BN=bn, BK=bk, num_warps=nw)
    (q, hp, b, e), rs, hs, cx = down.ops
    bn, bk, nw = cfg[1] if cfg else gemv_cfg(down, down.n_rows, T * k)
    _launch(_k_down, (T * k, triton.cdiv(down.n_rows, bn)), h, ids, wts.float().contiguous(), q, hp, b, e, y,
            down.n_rows, rs, hs, _magic(down), K=down.n_cols, **cx, BN=bn, BK=bk, num_warps=nw)
    return y.view(T, k, -1).sum(dim=1)  # the top-k sum: deterministic (no atomics), one tiny launch


def _decode_torch(x, ids, wts, gu: Experts, down: Experts) -> torch.Tensor:
    T, k = ids.shape
    ffn = gu.n_rows // 2
    y = torch.zeros((T, down.n_rows), dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in torch.unique(ids).tolist():
        if e < 0:  # computed elsewhere
            continue
        t, j = torch.nonzero(ids == e, as_tuple=True)
        g = xf[t] @ gu.dequant(e).t()
        h = F.silu(g[:, :ffn]) * g[:, ffn:]
        y.index_add_(0, t, (h @ down.dequant(e).t()) * wts[t, j].float()[:, None])
    return y


def tile_table(ids: torch.Tensor, n_expert: int, bm: int):
    """Pairs sorted by expert and the grouped GEMM's tiles, on the device without a sync:
    (order (P,) pair indices by expert, te, tm, tend (n_tiles,) int32: tile i covers sorted pairs
    [tm[i], min(tm[i] + bm, tend[i])) of expert te[i], or te[i] = -1). Pairs with ids < 0 (computed
    elsewhere) sort last, as an extra expert whose tiles are -1."""
    flat = ids.reshape(-1).long()
    P = flat.numel()
    flat = torch.where(flat < 0, n_expert, flat)
    n_expert += 1
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_expert, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)
    nt = (counts + bm - 1) // bm
    cum = torch.cumsum(nt, 0)
    i = torch.arange(P // bm + min(n_expert, P), device=flat.device)
    e = torch.searchsorted(cum, i, right=True)
    ec = e.clamp(max=n_expert - 1)
    tm = ends[ec] - counts[ec] + (i - (cum[ec] - nt[ec])) * bm
    te = torch.where(e < n_expert - 1, ec, -1)
    return order, te.int(), tm.int(), ends[ec].int()


def grouped_cfg(ex: Experts, n_pairs: int) -> qg.Cfg:
    """qgemm's tile config for the mean tokens per used expert (no K split: one tile per output)."""
    m = max(1, n_pairs // max(1, min(ex.n_expert, n_pairs)))
    return qg.candidates(ex.qtype, ex.n_rows, ex.n_cols, m)[0]._replace(split=1)


def grouped(x: torch.Tensor, src: torch.Tensor, table, ex: Experts, n_pairs: int, out_dtype=torch.bfloat16,
            cfg: qg.Cfg | None = None, zero: bool = False) -> torch.Tensor:
    """out (n_pairs, ex.n_rows): row s = x[src[s]] @ W(expert of sorted pair s)^T, by table's tiles
    (made with cfg.bm). x is multiplied as bf16 (fp16 if fp16), accumulating in fp32, as qgemm.
    zero: rows in no tile (skipped pairs) are 0, not left unwritten."""
    cfg = cfg or grouped_cfg(ex, n_pairs)
    te, tm, tend = table
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = (torch.zeros if zero else torch.empty)((n_pairs, ex.n_rows), dtype=out_dtype, device=x.device)
    if n_pairs == 0:
        return out
    (q, hp, b, e), rs, hs, cx = ex.ops
    xb = x.to(dt).contiguous()
    _launch(_k_grouped, (triton.cdiv(ex.n_rows, cfg.bn), te.numel()), xb, src.contiguous(), te, tm, tend,
            q, hp, b, e, out, ex.n_rows, rs, hs, _magic(ex), K=ex.n_cols, **cx, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
            SWAP=cfg.swap, INTERP=not x.is_cuda, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def prefill(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, gu: Experts, down: Experts,
            cfgs=None, up: Experts | None = None) -> torch.Tensor:
    """The routed SwiGLU experts of T tokens by grouped GEMMs (bf16 operands): (T, dim) fp32.
    gu: gate|up stacked per expert, or with `up` given the gate alone (streamed experts: a slot holds
    the tensors apart; one more launch). ids < 0: pairs computed elsewhere, 0 here."""
    T, k = ids.shape
    if not use_kernels(x):
        return _prefill_torch(x, ids, wts, gu, down, up)
    skip = up is not None  # only the streamed path skips pairs (and it knows ids on the host)
    c1, c2 = cfgs or (grouped_cfg(gu, T * k), grouped_cfg(down, T * k))
    order, *t1 = tile_table(ids, gu.n_expert, c1.bm)
    t2 = t1 if c2.bm == c1.bm else tile_table(ids, gu.n_expert, c2.bm)[1:]
    src = (order // k).int()
    # fp32 g and u: h is rounded to bf16 once (the next dot's operand), not g and u too
    g = grouped(x, src, t1, gu, T * k, out_dtype=torch.float32, cfg=c1, zero=skip)  # in expert order
    if up is None:
        g, u = g[:, :gu.n_rows // 2], g[:, gu.n_rows // 2:]
    else:
        u = grouped(x, src, t1, up, T * k, out_dtype=torch.float32, cfg=c1, zero=True)
    h = (F.silu(g) * u).to(torch.float16 if x.dtype == torch.float16 else torch.bfloat16)
    ys = grouped(h, torch.arange(T * k, dtype=torch.int32, device=x.device), t2, down, T * k,
                 out_dtype=torch.float32, cfg=c2, zero=skip)
    y = torch.empty_like(ys).index_copy_(0, order, ys)  # back to (token, slot) order
    return (y.view(T, k, -1) * torch.where(ids >= 0, wts.float(), 0.0)[..., None]).sum(dim=1)


def _prefill_torch(x, ids, wts, gu: Experts, down: Experts, up: Experts | None):
    if up is None:
        return _decode_torch(x, ids, wts, gu, down)
    return _decode_torch(x, ids, wts, _Stacked(gu, up), down)


class _Stacked:
    """gate and up Experts seen as a stacked gate|up for the torch fallback."""

    def __init__(self, gate: Experts, up: Experts):
        self.gate, self.up, self.n_rows = gate, up, 2 * gate.n_rows

    def dequant(self, e: int) -> torch.Tensor:
        return torch.cat([self.gate.dequant(e), self.up.dequant(e)])
