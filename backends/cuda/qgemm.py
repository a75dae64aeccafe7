"""Prefill matmul straight from quantized weights: y = x @ W^T with W dequantized tile by tile.

Dequantize + cuBLAS writes a bf16 copy of the whole weight (2 bytes per weight) and reads it back
for every ubatch: at -ub 512 that costs about as much as the matmul. Here a program loads the
quant words of a [BN, BK] tile of W, turns them into bf16 in registers and feeds `tl.dot` (tensor
cores: wgmma on Hopper) against a [BM, BK] tile of x; no float copy of W is ever written.

Formats (FMT): 0 GGUF 32-weight blocks (Q4_0..Q8_0, 2-byte aligned: uint16 words), 1 the
repacked resident layout (repack.Packed: int32 words, 16-byte loads), 2 Q4_K/Q5_K (16-byte
aligned blocks: int32 words), 3 Q6_K (uint16 words). A word is expanded into its values by
broadcasting it against a vector of shifts; the values come out in the block's own order, so the
tile is reshaped to [BN, BK] in natural k order and x is loaded plainly (contiguous, pipelined).
A b-bit value v becomes fp32 through the bits 0x4B000000 | v (the float 2^23 + v) minus a
constant: one LOP3 and one FADD, where an int->float convert issues at 1/8 of the FMA rate. Each
value is then scaled in fp32 exactly as gguf.quants does (d * q (+ m), (d*sc) * q - dmin*mn) and
rounded to bf16, so the operand equals what dequantize + cuBLAS multiplies.

SWAP=1 computes y^T = W x^T: the dequantized tile is the dot's first operand, which wgmma may take
from registers, and the token count is the MMA's N (16..256): small M wastes nothing. SPLIT > 1
splits K over programs (few output tiles: k/v projections, small M) into fp32 partials that torch
sums. Offsets that scale with rows or tokens are int64. Without a GPU the kernel runs in Triton's
interpreter (TRITON_INTERPRET=1, tests): a while loop (its range() takes no run-time bounds) and
fp32 dot operands (it multiplies bf16 as raw uint16), the values still rounded to bf16 first.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ...core.qtypes import QTYPE_INFO, QType
from . import dequant as ck
from . import gemv_q8
from .dequant import HAVE_TRITON, tl, triton
from .fast_launch import FastLaunch
from .repack import Packed

# 32-weight GGUF blocks: type -> (BITS, OFF, HAS_MIN, byte offset of qh or -1, byte offset of quants)
_G32 = {QType.Q4_0: (4, 8, 0, -1, 2), QType.Q4_1: (4, 0, 1, -1, 4), QType.Q5_0: (4, 16, 0, 2, 6),
        QType.Q5_1: (4, 0, 1, 4, 8), QType.Q8_0: (8, 128, 0, -1, 2)}
TYPES = frozenset(_G32) | {QType.Q4_K, QType.Q5_K, QType.Q6_K}


class Cfg(NamedTuple):
    bm: int  # tokens per program
    bn: int  # weight rows per program
    bk: int  # k per step: whole 32-blocks; divides 256 for the K-quants
    swap: int  # 1: dot(W tile, x tile^T)
    split: int  # programs along K (fp32 partials)
    warps: int
    stages: int


if HAVE_TRITON:

    @triton.jit
    def _f(u, OFF: tl.constexpr):
        """u - OFF in fp32 for int32 0 <= u < 2^23, without an int->float convert."""
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)

    @triton.jit
    def _w_g32(q_ptr, h_ptr, rows, RS, kb0, BN: tl.constexpr, BK: tl.constexpr, TS: tl.constexpr,
               BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr):
        """GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tile [BN, BK] fp32; q_ptr/h_ptr: uint16/fp16 views, RS words per row."""
        KB: tl.constexpr = BK // 32
        base = rows[:, None] * RS + (kb0 + tl.arange(0, KB))[None, :] * (TS // 2)  # [BN, KB] block's first word
        d = tl.load(h_ptr + base).to(tl.float32)
        if BITS == 8:
            w = tl.load(q_ptr + base[:, :, None] + QS // 2 + tl.arange(0, 16)[None, None, :]).to(tl.int32)
            t = tl.arange(0, 2)[None, None, None, :]
            u = ((w[:, :, :, None] >> (8 * t)) & 255) ^ 128  # value 2i + t, offset by 128 (signed)
            f = _f(tl.reshape(u, (BN, KB, 32)), OFF)
        else:
            w = tl.load(q_ptr + base[:, :, None] + QS // 2 + tl.arange(0, 8)[None, None, :]).to(tl.int32)
            h = tl.arange(0, 2)[None, None, :, None, None]
            t = tl.arange(0, 2)[None, None, None, None, :]
            u = tl.reshape((w[:, :, None, :, None] >> (4 * h + 8 * t)) & 15, (BN, KB, 32))  # 16h + 2i + t
            if QH >= 0:  # fifth bits: bit j of a 32-bit field (two words) for value j
                qh = tl.load(q_ptr + base + QH // 2).to(tl.int32) | (tl.load(q_ptr + base + QH // 2 + 1).to(tl.int32) << 16)
                u = u | (((qh[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1) << 4)
            f = _f(u, OFF)
        v = f * d[:, :, None]
        if HAS_MIN:
            v += tl.load(h_ptr + base + 1).to(tl.float32)[:, :, None]
        return tl.reshape(v, (BN, BK))

    @triton.jit
    def _w_packed(q_ptr, d_ptr, m_ptr, qh_ptr, rows, RS, HS, kb0, BN: tl.constexpr, BK: tl.constexpr,
                  BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr, HAS_QH: tl.constexpr):
        """repack.Packed tile [BN, BK] fp32: qs int32 (RS words per row), d/m/qh (HS per row)."""
        KB: tl.constexpr = BK // 32
        blk = rows[:, None] * HS + (kb0 + tl.arange(0, KB))[None, :]  # [BN, KB]
        d = tl.load(d_ptr + blk).to(tl.float32)
        wo = rows[:, None, None] * RS + (kb0 + tl.arange(0, KB))[None, :, None] * BITS  # BITS words per block
        w = tl.load(q_ptr + wo + tl.arange(0, BITS)[None, None, :])  # 16- or 32-byte runs
        if BITS == 8:
            t = tl.arange(0, 4)[None, None, None, :]
            f = _f(tl.reshape(((w[:, :, :, None] >> (8 * t)) & 255) ^ 128, (BN, KB, 32)), OFF)  # value 4i + t
        else:
            h = tl.arange(0, 2)[None, None, :, None, None]
            t = tl.arange(0, 4)[None, None, None, None, :]
            u = tl.reshape((w[:, :, None, :, None] >> (4 * h + 8 * t)) & 15, (BN, KB, 32))  # 16h + 4i + t
            if HAS_QH:
                qh = tl.load(qh_ptr + blk)
                u = u | (((qh[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1) << 4)
            f = _f(u, OFF)
        v = f * d[:, :, None]
        if HAS_MIN:
            v += tl.load(m_ptr + blk).to(tl.float32)[:, :, None]
        return tl.reshape(v, (BN, BK))

    @triton.jit
    def _w_k45(q_ptr, h_ptr, b_ptr, rows, RS, k0, BN: tl.constexpr, BK: tl.constexpr, TS: tl.constexpr,
               HAS_QH: tl.constexpr):
        """Q4_K/Q5_K tile [BN, BK] (BK | 256: one super-block): q_ptr int32, h_ptr fp16, b_ptr uint8 views."""
        NS: tl.constexpr = BK // 32
        s = ((k0 % 256) // 32 + tl.arange(0, NS))[None, :]  # [1, NS] sub-block
        bw = rows * RS + (k0 // 256) * (TS // 4)  # [BN] super-block's first word
        d = tl.load(h_ptr + bw * 2).to(tl.float32)[:, None]
        dmin = tl.load(h_ptr + bw * 2 + 1).to(tl.float32)[:, None]
        sb = (bw * 4)[:, None] + 4 + s % 4  # 6-bit scales and mins packed in bytes 4..15
        p = tl.load(b_ptr + sb).to(tl.int32)
        q = tl.load(b_ptr + sb + 4).to(tl.int32)
        r = tl.load(b_ptr + sb + 8).to(tl.int32)
        lo = s < 4
        sc = tl.where(lo, p & 63, (r & 15) | ((p >> 6) << 4)).to(tl.float32)
        mn = tl.where(lo, q & 63, (r >> 4) | ((q >> 6) << 4)).to(tl.float32)
        QSW: tl.constexpr = 4 + 8 * HAS_QH  # first quant word
        wo = bw[:, None, None] + QSW + (s // 2)[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        w = tl.load(q_ptr + wo)  # [BN, NS, 8]: 32 bytes per sub-block, nibble s % 2
        t = tl.arange(0, 4)[None, None, None, :]
        u = (w[:, :, :, None] >> (8 * t + 4 * (s % 2)[:, :, None, None])) & 15  # value 4i + t
        if HAS_QH:
            hw = tl.load(q_ptr + bw[:, None, None] + 4 + tl.arange(0, 8)[None, None, :])  # 32 bytes, bit s
            u = u | (((hw[:, :, :, None] >> (8 * t + s[:, :, None, None])) & 1) << 4)
        v = _f(tl.reshape(u, (BN, NS, 32)), 0.0) * (d * sc)[:, :, None] - (dmin * mn)[:, :, None]
        return tl.reshape(v, (BN, BK))

    @triton.jit
    def _w_q6k(q_ptr, h_ptr, b_ptr, rows, RS, k0, BN: tl.constexpr, BK: tl.constexpr):
        """Q6_K tile [BN, BK] (BK | 256): q_ptr uint16, h_ptr fp16, b_ptr uint8 views, RS words per row."""
        NS: tl.constexpr = BK // 32
        s = ((k0 % 256) // 32 + tl.arange(0, NS))[None, :, None, None, None]  # 32-value run 0..7
        bw = (rows * RS + (k0 // 256) * 105)[:, None, None, None, None]  # super-block's first word
        d = tl.load(h_ptr + bw + 104).to(tl.float32)
        hf = tl.arange(0, 2)[None, None, :, None, None]  # 16-value half: one int8 scale each
        i = hf * 8 + tl.arange(0, 8)[None, None, None, :, None]  # word in the run
        t = tl.arange(0, 2)[None, None, None, None, :]  # value 2i + t
        c = s // 4
        ql = tl.load(q_ptr + bw + c * 32 + (s % 2) * 16 + i).to(tl.int32)
        qh = tl.load(q_ptr + bw + 64 + c * 16 + i).to(tl.int32)
        u = ((ql >> (8 * t + 4 * ((s // 2) % 2))) & 15) | (((qh >> (8 * t + 2 * (s % 4))) & 3) << 4)
        sc = tl.load(b_ptr + bw * 2 + 192 + 2 * s + hf).to(tl.int8, bitcast=True).to(tl.float32)
        v = _f(u, 32.0) * (d * sc)
        return tl.reshape(v, (BN, BK))

    @triton.jit
    def _k_qgemm(x_ptr, q_ptr, h_ptr, b_ptr, e_ptr, out_ptr, M, N, K, RS, HS, KS, GROUP_M,
                 FMT: tl.constexpr, TS: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr,
                 HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr):
        """Program (pid, split s): y[BM tokens, BN rows] over k in [s*KS, (s+1)*KS). Programs are
        ordered GROUP_M token tiles at a time along each weight column tile, so the programs
        running together share W tiles in L2 (and x, which is smaller, stays there too)."""
        pid = tl.program_id(0)
        npm = (M + BM - 1) // BM  # tl.cdiv: a jit function, see `interp` in the tests
        npn = (N + BN - 1) // BN
        width = GROUP_M * npn
        first = (pid // width) * GROUP_M
        gm = tl.minimum(npm - first, GROUP_M)
        pid_m = first + (pid % width) % gm
        pid_n = (pid % width) // gm
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        xr = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * K  # clamped: loads need no masks
        rows = tl.minimum(rn, N - 1).to(tl.int64)
        acc = tl.full([BN, BM] if SWAP else [BM, BN], 0.0, tl.float32)  # tl.zeros: a jit function too
        k_lo = tl.program_id(1) * KS
        if INTERP:
            k0 = k_lo
            while k0 < k_lo + KS:
                acc = _step(acc, xr, q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0, FMT, TS, BITS, OFF, HAS_MIN,
                            QH, QS, BN, BK, SWAP, INTERP)
                k0 += BK
        else:
            for kk in range(0, KS, BK):
                acc = _step(acc, xr, q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k_lo + kk, FMT, TS, BITS, OFF,
                            HAS_MIN, QH, QS, BN, BK, SWAP, INTERP)
        o = out_ptr + tl.program_id(1).to(tl.int64) * M * N  # split s: its own fp32 partial
        if SWAP:
            tl.store(o + rm.to(tl.int64)[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty),
                     mask=(rm[None, :] < M) & (rn[:, None] < N))
        else:
            tl.store(o + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _step(acc, xr, q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0, FMT: tl.constexpr, TS: tl.constexpr,
              BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr):
        x = tl.load(xr + k0 + tl.arange(0, BK)[None, :])
        if FMT == 0:
            w = _w_g32(q_ptr, h_ptr, rows, RS, k0 // 32, BN, BK, TS, BITS, OFF, HAS_MIN, QH, QS)
        elif FMT == 1:
            w = _w_packed(q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0 // 32, BN, BK, BITS, OFF, HAS_MIN, QH >= 0)
        elif FMT == 2:
            w = _w_k45(q_ptr, h_ptr, b_ptr, rows, RS, k0, BN, BK, TS, QH >= 0)
        else:
            w = _w_q6k(q_ptr, h_ptr, b_ptr, rows, RS, k0, BN, BK)
        w = w.to(x.dtype)
        if INTERP:  # the interpreter's dot reads bf16 as its raw uint16: multiply the same values in fp32
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        if SWAP:
            return tl.dot(w, tl.trans(x), acc)
        return tl.dot(x, tl.trans(w), acc)


_SMS = 132  # an H200's multiprocessors, off the GPU (the split heuristic's unit)
_fast: dict = {}


def _sms(dev: torch.device) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else _SMS


def _bk(bk: int, qtype: QType, n_cols: int) -> int:
    """The largest k step <= bk that tiles K (32-blocks) or a super-block (K-quants)."""
    unit = 256 if QTYPE_INFO[qtype].block_size == 256 else n_cols
    while bk > 32 and unit % bk:
        bk //= 2
    return bk


def _split(m: int, n: int, k: int, bm: int, bn: int, bk: int, sms: int) -> int:
    """Split K while the output tiles alone leave multiprocessors idle (k/v projections, small M),
    keeping >= 4 steps per program and the split dividing the steps."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    steps = k // bk
    s = 1
    while tiles * s * 2 <= 2 * sms and steps % (s * 2) == 0 and steps // (s * 2) >= 4:
        s *= 2
    return s


# (BM, BN, BK, SWAP, warps, stages) per token bucket: the first is the default, the rest are what
# the measurement (matmul_choice.py) and tools/bench_qgemm.py also try. Few tokens: W as the MMA's
# M side (SWAP), tokens as its N; many: 128-256 wide tiles of both.
_TABLE = {
    16: [(16, 64, 128, 1, 4, 3), (16, 128, 64, 1, 4, 4)],
    32: [(32, 64, 128, 1, 4, 3), (32, 128, 64, 1, 4, 4)],
    64: [(64, 128, 64, 1, 4, 4), (64, 64, 128, 1, 4, 3)],
    128: [(128, 128, 64, 1, 8, 3), (128, 128, 64, 0, 8, 3)],
    256: [(128, 256, 64, 0, 8, 3), (256, 128, 64, 1, 8, 3), (128, 128, 64, 0, 4, 4)],
}


def candidates(qtype: QType, n_rows: int, n_cols: int, m: int, device=None) -> list[Cfg]:
    """Tile configs for an (n_rows x n_cols) weight of `qtype` against m tokens, default first."""
    bucket = min(256, max(16, triton.next_power_of_2(m)))
    sms = _sms(torch.device(device) if device is not None else torch.device("cpu"))
    out = []
    for bm, bn, bk, swap, nw, ns in _TABLE[bucket]:
        bk = _bk(bk, QType(qtype), n_cols)
        out.append(Cfg(bm, bn, bk, swap, _split(m, n_rows, n_cols, bm, bn, bk, sms), nw, ns))
    return out


def _operands(w, qtype: QType, n_rows: int, n_cols: int):
    """(q, h, b, e pointers, RS, HS, format constexprs) of a weight: GGUF blocks or a Packed."""
    if isinstance(w, Packed):
        if w.qtype not in _G32 or w.shape != (n_rows, n_cols) or w.qs.stride(1) != 1 or w.d.stride(1) != 1 \
                or any(t is not None and t.stride() != w.d.stride() for t in (w.m, w.qh)):
            raise ValueError(f"qgemm: unsupported Packed weight {w.qtype.name} {w.shape}")
        bits, off, has_min, qh, qs = _G32[w.qtype]
        ptrs = (w.qs, w.d, w.m if w.m is not None else w.d, w.qh if w.qh is not None else w.d)
        return ptrs, w.qs.stride(0), w.d.stride(0), dict(FMT=1, TS=0, BITS=bits, OFF=off, HAS_MIN=has_min,
                                                         QH=qh, QS=qs)
    info = QTYPE_INFO[qtype]
    rb = n_cols // info.block_size * info.type_size
    flat = w.reshape(-1)
    if qtype not in TYPES or n_cols % info.block_size or flat.dtype != torch.uint8 or flat.numel() != n_rows * rb \
            or not flat.is_contiguous():
        raise ValueError(f"qgemm: need {n_rows}x{n_cols} {qtype.name} as contiguous uint8 blocks ({n_rows * rb} "
                         f"bytes), found {flat.dtype} {flat.numel()}")
    wide = qtype in (QType.Q4_K, QType.Q5_K)  # 16-byte aligned blocks: int32 words
    if flat.data_ptr() % (4 if wide else 2):
        raise ValueError("qgemm: weight bytes must start 2-byte (Q4_K/Q5_K: 4-byte) aligned")
    q = flat.view(torch.int32) if wide else flat.view(torch.uint16)
    h = flat.view(torch.float16)
    if qtype in _G32:
        bits, off, has_min, qh, qs = _G32[qtype]
        cx = dict(FMT=0, TS=info.type_size, BITS=bits, OFF=off, HAS_MIN=has_min, QH=qh, QS=qs)
    else:
        cx = dict(FMT=2 if wide else 3, TS=info.type_size, BITS=0, OFF=0, HAS_MIN=0,
                  QH=16 if qtype == QType.Q5_K else -1, QS=0)
    return (q, h, flat, flat), rb // (4 if wide else 2), 0, cx


def _reference(x: torch.Tensor, w, qtype: QType, n_cols: int, dt: torch.dtype) -> torch.Tensor:
    """Without Triton: dequantize in torch, multiply the same operand values in fp32."""
    wf = gemv_q8.dequantize(w, dt) if isinstance(w, Packed) else ck.dequantize(w, qtype, n_cols, dt, use_triton=False)
    return x.to(dt).float() @ wf.float().t()


def qgemm(x: torch.Tensor, w, qtype: QType, n_rows: int, n_cols: int, out_dtype: torch.dtype | None = None,
          cfg: Cfg | None = None) -> torch.Tensor:
    """y = x @ W^T, (M, n_cols) x (n_rows, n_cols) -> (M, n_rows) in out_dtype (default x's dtype).

    x: fp32/bf16/fp16; its rows are multiplied as bf16 (fp16 if x is fp16), with W's values
    rounded the same way, accumulating in fp32. w: GGUF blocks of `qtype`, uint8 (n_rows,
    row_bytes) or flat, or a repack.Packed. cfg: a Cfg (default: candidates()[0])."""
    qtype = QType(w.qtype if isinstance(w, Packed) else qtype)
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != n_cols:
        raise ValueError(f"qgemm: x must be (M, {n_cols}), found {tuple(x.shape)}")
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out_dtype = out_dtype or x.dtype
    ptrs, rs, hs, cx = _operands(w, qtype, n_rows, n_cols)
    if not (HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")):
        return _reference(x, w, qtype, n_cols, dt).to(out_dtype)
    cfg = cfg or candidates(qtype, n_rows, n_cols, m, x.device)[0]
    bm, bn, bk, swap, split, nw, ns = cfg
    if n_cols % (bk * split) or (QTYPE_INFO[qtype].block_size == 256 and 256 % bk) or bk % 32:
        raise ValueError(f"qgemm: config {cfg} does not tile K={n_cols} of {qtype.name}")
    xb = x.to(dt).contiguous()
    if split > 1:
        part = torch.empty((split, m, n_rows), dtype=torch.float32, device=x.device)
    else:
        part = torch.empty((m, n_rows), dtype=out_dtype, device=x.device)
    if m == 0 or n_rows == 0:
        return torch.zeros((m, n_rows), dtype=out_dtype, device=x.device)
    npm, npn = triton.cdiv(m, bm), triton.cdiv(n_rows, bn)
    group = max(1, min(npm, (16 << 20) // (bm * n_cols * 2)))  # token tiles whose x stays in L2
    k = _k_qgemm
    fl = _fast.get(k) or _fast.setdefault(k, FastLaunch(k))
    fl((npm * npn, split), xb, *ptrs, part, m, n_rows, n_cols, rs, hs, n_cols // split, group,
       **cx, BM=bm, BN=bn, BK=bk, SWAP=swap, INTERP=not x.is_cuda, num_warps=nw, num_stages=ns)
    if split == 1:
        return part
    return part.sum(0, dtype=torch.float32).to(out_dtype)
