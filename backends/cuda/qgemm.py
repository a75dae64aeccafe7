"""Prefill matmul straight from quantized weights: y = x @ W^T with W dequantized tile by tile.

Dequantize + cuBLAS writes a bf16 copy of the whole weight (2 bytes per weight) and reads it back
for every ubatch: at -ub 512 that costs about as much as the matmul. Here a program loads the
quant words of a [BN, BK] tile of W, turns them into bf16 in registers and feeds `tl.dot` (tensor
cores: wgmma on Hopper) against a [BM, BK] tile of x; no float copy of W is ever written.

Formats (FMT): 0 GGUF 32-weight blocks (Q4_0..Q8_0, 2-byte aligned: uint16 words), 1 the
repacked resident layout (repack.Packed: int32 words, 16-byte loads), 2 Q4_K/Q5_K (16-byte
aligned blocks: int32 words), 3 Q6_K (uint16 words). Words expand into their values with
tl.join, which keeps a word's values in the thread that loaded it, in the block's own order, so
the tile is [BN, BK] in natural k order and x is loaded plainly (contiguous, pipelined). A b-bit
value v is moved to the top mantissa bits of 1.0f (the float 1 + v/2^b: no int->float convert,
which issues at 1/8 of the FMA rate) and scaled with one FMA per weight; the products are exact
for 4/5-bit quants and fp16 scales, so the bf16 operand is what dequantize + cuBLAS multiplies
(up to one fp32 rounding of the added min terms).

SWAP=1 computes y^T = W x^T: the dequantized tile is the dot's first operand, which wgmma takes
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
from .fast_launch import launcher
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
    def _place(w, SH: tl.constexpr, FB: tl.constexpr, AT: tl.constexpr):
        """Bits SH..SH+FB-1 of the uint32 words w moved to bits AT..AT+FB-1, the rest zero."""
        if SH >= AT:
            t = w >> (SH - AT)
        else:
            t = w << (AT - SH)
        return t & (((1 << FB) - 1) << AT)

    @triton.jit
    def _field(w, SH: tl.constexpr, FB: tl.constexpr, AT: tl.constexpr, BPW: tl.constexpr, R: tl.constexpr,
               NB: tl.constexpr):
        """Bits SH..SH+FB-1 of every byte of the [R, NB // BPW] words w (BPW bytes each, little endian)
        at bit AT: [R, NB] in byte order (a broadcast against shifts made each thread reload the word)."""
        if BPW == 4:
            v = tl.join(tl.join(_place(w, SH, FB, AT), _place(w, SH + 16, FB, AT)),
                        tl.join(_place(w, SH + 8, FB, AT), _place(w, SH + 24, FB, AT)))
        else:
            v = tl.join(_place(w, SH, FB, AT), _place(w, SH + 8, FB, AT))
        return tl.reshape(v, (R, NB))

    @triton.jit
    def _unpack(w, FB: tl.constexpr, AT: tl.constexpr, BPW: tl.constexpr, R: tl.constexpr, NB: tl.constexpr):
        """All 8 // FB fields of every byte, field-major ([R, 8 // FB * NB]): GGUF's order for 4-bit
        quants (low nibbles of a run of bytes, then high) and Q6_K's 2-bit high parts."""
        if FB == 8:
            v = _field(w, 0, 8, AT, BPW, R, NB)
        elif FB == 4:
            v = tl.join(_field(w, 0, 4, AT, BPW, R, NB), _field(w, 4, 4, AT, BPW, R, NB))
            v = tl.reshape(tl.permute(v, (0, 2, 1)), (R, 2 * NB))
        else:  # [.., byte, j, s]: field 2j + s
            v = tl.join(tl.join(_field(w, 0, 2, AT, BPW, R, NB), _field(w, 4, 2, AT, BPW, R, NB)),
                        tl.join(_field(w, 2, 2, AT, BPW, R, NB), _field(w, 6, 2, AT, BPW, R, NB)))
            v = tl.reshape(tl.permute(v, (0, 2, 3, 1)), (R, 4 * NB))
        return v

    @triton.jit
    def _fma(u, MAGIC, a, b):
        """u: a B-bit value at bits 23-B..22 (_place). u ^ MAGIC is the float 1 + v/2^B (MAGIC = 1.0f's
        bits, with bit 22 flipped for int8: v = q + 128), with no int->float convert (1/8 of the FMA
        rate); a = 2^B * scale, b = -(2^B + OFF) * scale (+ min), so a*f + b = (v - OFF) * scale
        (+ min): exact for 4/5-bit quants and fp16 scales ((2^B + v) * d has <= 24 bits)."""
        return (u ^ MAGIC).to(tl.float32, bitcast=True) * a + b

    @triton.jit
    def _w_q32(q_ptr, h_ptr, m_ptr, qh_ptr, rows, RS, HS, kb0, MAGIC, BN: tl.constexpr, BK: tl.constexpr,
               FMT: tl.constexpr, TS: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr,
               HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr):
        """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tile [BN, BK] fp32. FMT 0, GGUF blocks: q_ptr uint16 and h_ptr
        fp16 views (RS words per row); FMT 1, Packed: q_ptr int32 quants (RS per row), h_ptr d,
        m_ptr m, qh_ptr qh (HS per row)."""
        KB: tl.constexpr = BK // 32
        B: tl.constexpr = 8 if BITS == 8 else (5 if QH >= 0 else 4)  # bits of a value
        BPW: tl.constexpr = 4 if FMT == 1 else 2  # bytes per loaded word
        NW: tl.constexpr = BITS * 4 // BPW  # words per block (16 or 32 quant bytes)
        blk = kb0 + tl.arange(0, KB)[None, :]
        if FMT == 1:
            sb = rows[:, None] * HS + blk  # [BN, KB] scales
            wo = rows[:, None, None] * RS + blk[:, :, None] * NW
        else:
            sb = rows[:, None] * RS + blk * (TS // 2)  # [BN, KB] first word of the block
            wo = sb[:, :, None] + QS // 2
        d = tl.load(h_ptr + sb).to(tl.float32)
        w = tl.load(q_ptr + wo + tl.arange(0, NW)[None, None, :]).to(tl.uint32, bitcast=FMT == 1)
        u = tl.reshape(_unpack(tl.reshape(w, (BN * KB, NW)), BITS, 23 - B, BPW, BN * KB, NW * BPW), (BN, KB, 32))
        if QH >= 0:  # fifth bits: bit j of a 32-bit field for value j, to bit 22
            if FMT == 1:
                qh = tl.load(qh_ptr + sb).to(tl.uint32, bitcast=True)
            else:
                qh = tl.load(q_ptr + sb + QH // 2).to(tl.uint32)
                qh = qh | (tl.load(q_ptr + sb + QH // 2 + 1).to(tl.uint32) << 16)
            u = u | (((qh[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1) << 22)
        a = d * (1 << B)
        b = d * -((1 << B) + OFF)
        if HAS_MIN:
            if FMT == 1:
                b += tl.load(m_ptr + sb).to(tl.float32)
            else:
                b += tl.load(h_ptr + sb + 1).to(tl.float32)
        return tl.reshape(_fma(u, MAGIC, a[:, :, None], b[:, :, None]), (BN, BK))

    @triton.jit
    def _w_k45(q_ptr, h_ptr, b_ptr, rows, RS, k0, MAGIC, BN: tl.constexpr, BK: tl.constexpr, TS: tl.constexpr,
               HAS_QH: tl.constexpr):
        """Q4_K/Q5_K tile [BN, BK] (64 <= BK <= 256, BK | 256: whole sub-block pairs of one
        super-block): q_ptr int32, h_ptr fp16, b_ptr uint8 views, RS int32 words per row."""
        NS: tl.constexpr = BK // 32
        B: tl.constexpr = 4 + HAS_QH
        s = ((k0 % 256) // 32 + tl.arange(0, NS))[None, :]  # [1, NS] sub-block
        bw = rows * RS + (k0 // 256) * (TS // 4)  # [BN] super-block's first word
        d = tl.load(h_ptr + bw * 2).to(tl.float32)[:, None]
        dmin = tl.load(h_ptr + bw * 2 + 1).to(tl.float32)[:, None]
        sb = (bw * 4)[:, None] + 4 + s % 4  # 6-bit scales and mins packed in bytes 4..15
        p = tl.load(b_ptr + sb).to(tl.int32)
        q = tl.load(b_ptr + sb + 4).to(tl.int32)
        r = tl.load(b_ptr + sb + 8).to(tl.int32)
        lo = s < 4
        ds = d * tl.where(lo, p & 63, (r & 15) | ((p >> 6) << 4)).to(tl.float32)
        dm = dmin * tl.where(lo, q & 63, (r >> 4) | ((q >> 6) << 4)).to(tl.float32)
        # sub-blocks 2c, 2c+1: the low, then high nibbles of the same 32 bytes (8 words)
        QSW: tl.constexpr = 4 + 8 * HAS_QH
        c = (k0 % 256) // 64 + tl.arange(0, NS // 2)
        w = tl.load(q_ptr + bw[:, None, None] + QSW + c[None, :, None] * 8 + tl.arange(0, 8)[None, None, :])
        w = tl.reshape(w.to(tl.uint32, bitcast=True), (BN * NS // 2, 8))
        u = tl.reshape(_unpack(w, 4, 23 - B, 4, BN * NS // 2, 32), (BN, NS, 32))
        if HAS_QH:  # 32 bytes at 16: bit s of byte i is the fifth bit of value i of sub-block s
            hw = tl.load(q_ptr + bw[:, None] + 4 + tl.arange(0, 8)[None, :]).to(tl.uint32, bitcast=True)
            hb = tl.reshape(_field(hw, 0, 8, 0, 4, BN, 32), (BN, 1, 32))
            u = u | (((hb >> s[:, :, None].to(tl.uint32)) & 1) << 22)
        a = ds * (1 << B)
        b = -(ds * (1 << B) + dm)
        return tl.reshape(_fma(u, MAGIC, a[:, :, None], b[:, :, None]), (BN, BK))

    @triton.jit
    def _w_q6k(q_ptr, h_ptr, b_ptr, rows, RS, k0, MAGIC, BN: tl.constexpr):
        """Q6_K tile [BN, 128], half c of a super-block: runs r of 32 values (ql bytes (r % 2) * 32 + i,
        nibble r // 2; qh byte i, bits 2r..2r+1), an int8 scale per 16. q_ptr uint16 (RS per row)."""
        c = (k0 % 256) // 128
        bw = rows * RS + (k0 // 256) * 105  # [BN] super-block's first word
        d = tl.load(h_ptr + bw + 104).to(tl.float32)[:, None]
        ql = tl.load(q_ptr + bw[:, None] + c * 32 + tl.arange(0, 32)[None, :]).to(tl.uint32)
        qh = tl.load(q_ptr + bw[:, None] + 64 + c * 16 + tl.arange(0, 16)[None, :]).to(tl.uint32)
        u = _unpack(ql, 4, 17, 2, BN, 64) | _unpack(qh, 2, 21, 2, BN, 32)  # [BN, 128]
        # ql word i's scales (nibble h: group 4h + i // 8) in the words' shape, expanded as _unpack does
        i = tl.arange(0, 32)[None, :] // 8
        sb = b_ptr + bw[:, None] * 2 + 192 + c * 8 + i
        dl = d * tl.load(sb).to(tl.int8, bitcast=True).to(tl.float32)  # [BN, 32]
        dh = d * tl.load(sb + 4).to(tl.int8, bitcast=True).to(tl.float32)
        a = tl.reshape(tl.permute(tl.join(tl.reshape(tl.join(dl, dl), (BN, 64)), tl.reshape(tl.join(dh, dh), (BN, 64))),
                                  (0, 2, 1)), (BN, 128))
        return _fma(u, MAGIC, a * 64.0, a * -96.0)

    @triton.jit
    def _k_qgemm(x_ptr, q_ptr, h_ptr, b_ptr, e_ptr, out_ptr, M, N, K, RS, HS, KS, GROUP_M, MAGIC,
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
        if SWAP:  # (tl.zeros is a jit function too)
            acc = tl.full([BN, BM], 0.0, tl.float32)
        else:
            acc = tl.full([BM, BN], 0.0, tl.float32)
        k_lo = tl.program_id(1) * KS
        if INTERP:
            k0 = k_lo
            while k0 < k_lo + KS:
                acc = _step(acc, xr, q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0, MAGIC, FMT, TS, BITS, OFF, HAS_MIN,
                            QH, QS, BN, BK, SWAP, INTERP)
                k0 += BK
        else:
            for kk in range(0, KS, BK):
                acc = _step(acc, xr, q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k_lo + kk, MAGIC, FMT, TS, BITS, OFF,
                            HAS_MIN, QH, QS, BN, BK, SWAP, INTERP)
        o = out_ptr + tl.program_id(1).to(tl.int64) * M * N  # split s: its own fp32 partial
        if SWAP:
            tl.store(o + rm.to(tl.int64)[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty),
                     mask=(rm[None, :] < M) & (rn[:, None] < N))
        else:
            tl.store(o + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _step(acc, xr, q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0, MAGIC, FMT: tl.constexpr, TS: tl.constexpr,
              BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr, QH: tl.constexpr, QS: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr):
        x = tl.load(xr + k0 + tl.arange(0, BK)[None, :])
        if FMT <= 1:
            w = _w_q32(q_ptr, h_ptr, b_ptr, e_ptr, rows, RS, HS, k0 // 32, MAGIC, BN, BK, FMT, TS, BITS, OFF,
                       HAS_MIN, QH, QS)
        elif FMT == 2:
            w = _w_k45(q_ptr, h_ptr, b_ptr, rows, RS, k0, MAGIC, BN, BK, TS, QH >= 0)
        else:
            w = _w_q6k(q_ptr, h_ptr, b_ptr, rows, RS, k0, MAGIC, BN)
        w = w.to(x.dtype)
        if INTERP:  # the interpreter's dot reads bf16 as its raw uint16: multiply the same values in fp32
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        return acc


_ONE = 0x3F800000  # 1.0f: a run-time argument, so ptxas keeps it in a register and fuses mask and xor


def _sms(dev: torch.device) -> int:  # off the GPU: an H200's (the split heuristic's unit)
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132


def _bk(bk: int, qtype: QType, n_cols: int) -> int:
    """The k step nearest bk that the format allows: whole 32-blocks dividing K; for Q4_K/Q5_K
    whole sub-block pairs of one super-block (64..256); for Q6_K half a super-block (128)."""
    if qtype == QType.Q6_K:
        return 128
    if QTYPE_INFO[qtype].block_size == 256:
        return min(256, max(64, bk))
    while bk > 32 and n_cols % bk:
        bk //= 2
    return bk


def fit(cfg: Cfg, qtype: QType, n_cols: int) -> Cfg:
    """cfg with its k step made legal for the format, its split dividing the k steps, at most 64
    weights of the W tile per thread and an x tile of at most 32 KB (Q6_K's 128-wide k step:
    fewer rows and tokens per tile; more spill registers or overflow shared memory on sm_90)."""
    bk = _bk(cfg.bk, QType(qtype), n_cols)
    bm, bn, split = cfg.bm, cfg.bn, cfg.split
    while bn > 16 and bn * bk > 64 * 32 * cfg.warps:
        bn //= 2
    while bm > 16 and bm * bk > 256 * 64:
        bm //= 2
    while split > 1 and (n_cols // bk) % split:
        split //= 2
    return cfg._replace(bm=bm, bn=bn, bk=bk, split=split)


def _split(m: int, n: int, k: int, bm: int, bn: int, bk: int, sms: int) -> int:
    """Split K while the output tiles alone leave multiprocessors idle (k/v projections, small M)
    but the programs stay within one wave (the fp32 partials cost traffic), keeping >= 4 steps
    per program and the split dividing the steps."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    steps = k // bk
    s = 1
    while tiles * s * 2 <= sms and steps % (s * 2) == 0 and steps // (s * 2) >= 4:
        s *= 2
    return s


# (BM, BN, BK, SWAP, warps, stages) per token bucket: the first is the default, the rest are what
# the measurement (matmul_choice.py) and tools/bench_qgemm.py also try. W is the MMA's M side (SWAP:
# its dequantized tile goes to wgmma from registers) and the tokens its N (16..256), so few tokens
# waste no MMA work. Chosen from sm_90 builds (ptxas, no GPU): no spills; at 4 warps ptxas often
# serializes the wgmmas of a register operand (warning C7515), at 8 rarely; loop instructions per
# weight ~7, so the MMA covers the dequantization (MMA/issue >= 1) from 128 tokens per tile.
_TABLE = {
    16: [(16, 128, 64, 1, 8, 3), (16, 64, 128, 1, 4, 3)],
    32: [(32, 128, 64, 1, 8, 3), (32, 128, 64, 1, 4, 4)],
    64: [(64, 128, 64, 1, 8, 3), (64, 128, 64, 1, 4, 4)],
    128: [(128, 128, 64, 1, 8, 3), (128, 128, 64, 0, 8, 3)],
    256: [(256, 128, 64, 1, 8, 3), (128, 256, 64, 0, 8, 3), (128, 128, 64, 1, 8, 3)],
}


def candidates(qtype: QType, n_rows: int, n_cols: int, m: int, device=None) -> list[Cfg]:
    """Tile configs for an (n_rows x n_cols) weight of `qtype` against m tokens, default first."""
    bucket = min(256, max(16, triton.next_power_of_2(m)))
    sms = _sms(torch.device(device) if device is not None else torch.device("cpu"))
    out = []
    for bm, bn, bk, swap, nw, ns in _TABLE[bucket]:
        c = fit(Cfg(bm, bn, bk, swap, 1, nw, ns), qtype, n_cols)
        c = fit(c._replace(split=_split(m, n_rows, n_cols, bm, c.bn, c.bk, sms)), qtype, n_cols)
        if c not in out:
            out.append(c)
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
    if not (HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")):  # torch, same operands
        wf = gemv_q8.dequantize(w, dt) if isinstance(w, Packed) else ck.dequantize(w, qtype, n_cols, dt, use_triton=False)
        return (x.to(dt).float() @ wf.float().t()).to(out_dtype)
    cfg = cfg or candidates(qtype, n_rows, n_cols, m, x.device)[0]
    bm, bn, bk, swap, split, nw, ns = cfg
    if n_cols % (bk * split) or bk != _bk(bk, qtype, n_cols):
        raise ValueError(f"qgemm: config {cfg} does not tile K={n_cols} of {qtype.name}")
    if m == 0 or n_rows == 0:
        return torch.zeros((m, n_rows), dtype=out_dtype, device=x.device)
    xb = x.to(dt).contiguous()
    part = torch.empty((split, m, n_rows), dtype=torch.float32, device=x.device) if split > 1 else \
        torch.empty((m, n_rows), dtype=out_dtype, device=x.device)
    npm, npn = triton.cdiv(m, bm), triton.cdiv(n_rows, bn)
    group = max(1, min(npm, (16 << 20) // (bm * n_cols * 2)))  # token tiles whose x stays in L2
    fl = launcher(_k_qgemm)
    magic = _ONE ^ (1 << 22) if cx["BITS"] == 8 else _ONE  # int8: q + 128, by flipping its top bit
    fl((npm * npn, split), xb, *ptrs, part, m, n_rows, n_cols, rs, hs, n_cols // split, group, magic,
       **cx, BM=bm, BN=bn, BK=bk, SWAP=swap, INTERP=not x.is_cuda, num_warps=nw, num_stages=ns)
    if split == 1:
        return part
    return part.sum(0, dtype=torch.float32).to(out_dtype)
