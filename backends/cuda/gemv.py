"""Quantized matrix-vector products for decode: y = x @ W^T straight from GGUF blocks.

Decode reads every weight once per token, so its speed is bytes read / bandwidth. Dequantize to
fp16 + cuBLAS reads the blocks, writes 2 bytes per weight and reads them back (3.5x+ the bytes of
a 4-bit weight); these kernels read each block once, for a batch of 1 to MAX_BATCH rows of x.

A program owns BN rows and walks them whole, KB blocks per step (layout: see below). Written in
Gluon (Triton with explicit layouts): plain Triton chose one layout per load here and shuffled every
tile through shared memory. All sums are fp32; the only cross-thread sum is the final one.

Integer -> float in ~2 ops per weight: quants are loaded as 16-bit words (blocks are only 2-byte
aligned), and a b-bit value v moved into the top mantissa bits of 1.0f (one shift + one LOP3) is
the float f = 1 + v/2^b, no int->float convert (I2F issues at 1/8 of the FMA rate). As
sum(f*x) = sum(x) + sum(v*x)/2^b, sum((v - OFF)*x) = 2^b*sum(f*x) - (2^b + OFF)*sum(x), with sum(x)
per group shared by the BN rows. The cancellation costs at most 8 of the 24 bits.

Without Triton/Gluon (CPU, CI) `gemv` falls back to dequantize + matmul. CUDA-graph safe: no host
sync, configs depend on shapes only.
"""
from __future__ import annotations

import torch

from ...core.batch import SMALL_BATCH
from ...core.qtypes import QTYPE_INFO, QType
from . import dequant as ck
from .fast_launch import FastLaunch

try:  # Gluon (Triton's explicit-layout dialect, triton >= 3.5) runs the kernels; optional like Triton
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAVE_GLUON = ck.HAVE_TRITON
except ImportError:  # pragma: no cover - depends on the install
    HAVE_GLUON = False

MAX_BATCH = SMALL_BATCH  # rows of x per launch: a decode-sized batch (core/batch.py)
GEMV_TYPES = frozenset(ck.QUANT_TYPES)
_ONE = 0x3F800000  # 1.0f: the exponent the quants are OR'ed into (passed at run time, see _f)

if HAVE_GLUON:
    # Every tensor of a kernel is 4-D [G, BN, BP, TI] in one blocked layout L: TI threads along the
    # quant words of a group (consecutive words, so a warp load covers a few contiguous runs), the
    # other 32/TI lanes and all warps along G; BN and BP stay in each thread's registers, so one x
    # load serves BN rows and one weight word serves BP batch rows. A thread walks SPT words of its
    # group (a static loop, word s*TI + lane) and sums them before the group's scale is applied.

    @gluon.jit
    def _vec(n: gl.constexpr, dim: gl.constexpr, L: gl.constexpr):
        """arange(n) along `dim` of a 4-D tensor in layout L (size 1 elsewhere)."""
        if dim == 0:
            v = gl.arange(0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))
            return gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 1), 2), 3)
        elif dim == 1:
            v = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))
            return gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 2), 3)
        elif dim == 2:
            v = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(3, L))))
            return gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 0), 3)
        else:
            v = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L))))
            return gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 0), 0)

    @gluon.jit
    def _place(w, SHIFT: gl.constexpr, BITS: gl.constexpr, AT: gl.constexpr):
        """Bits SHIFT.. of w moved to bit AT, masked to BITS bits: one shift + (with _f) one LOP3."""
        t = w >> (SHIFT - AT) if SHIFT >= AT else w << (AT - SHIFT)
        return t & (((1 << BITS) - 1) << AT)

    @gluon.jit
    def _f(v, MAGIC):
        """v (a b-bit value at bits 23-b..22) as the float 1 + v/2^b. MAGIC = 1.0f's bits (^ a sign
        flip for int8): a run-time value, so ptxas keeps it in a register and fuses mask and OR into
        one LOP3 (two immediates would take two)."""
        return (v ^ MAGIC).to(gl.float32, bitcast=True)

    @gluon.jit
    def _xpair(p, XD: gl.constexpr):
        """x[2j], x[2j+1] as fp32 from one load of pair j: x viewed as int32 (XD 0: fp16, 1: bf16)
        or int64 (XD 2: fp32); one pair matches the two columns of a 16-bit quant word."""
        if XD == 0:
            lo = p.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            hi = (p >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        elif XD == 1:
            lo = (p << 16).to(gl.float32, bitcast=True)
            hi = (p & -65536).to(gl.float32, bitcast=True)
        else:
            lo = p.to(gl.int32).to(gl.float32, bitcast=True)
            hi = (p >> 32).to(gl.int32).to(gl.float32, bitcast=True)
        return lo, hi

    @gluon.jit
    def _h(p):
        return gl.load(p).to(gl.float16, bitcast=True).to(gl.float32)

    @gluon.jit
    def _store(out_ptr, acc, pid, B, N, BN: gl.constexpr, BP: gl.constexpr, L: gl.constexpr):
        y = gl.sum(gl.sum(acc, axis=3), axis=0)  # [BN, BP]: the only cross-thread sum
        LY: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(3, L))
        ro = pid * BN + gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(1, LY)), 1)
        bo = gl.expand_dims(gl.arange(0, BP, layout=gl.SliceLayout(0, LY)), 0)
        gl.store(out_ptr + bo * N + ro, y.to(out_ptr.dtype.element_ty), mask=(ro < N) & (bo < B))

    @gluon.jit
    def _qv(qw, qh, n: gl.constexpr, BITS: gl.constexpr, HB: gl.constexpr, AT: gl.constexpr, MAGIC):
        """Value n (BITS bits at n*BITS) of quant word qw, with bit HB of qh as its 5th bit if HB >= 0,
        as the float 1 + v/2^b (b = 23 - AT)."""
        v = _place(qw, n * BITS, BITS, AT)
        if HB >= 0:
            v = v | _place(qh, HB, 1, AT + 4)
        return _f(v, MAGIC)

    @gluon.jit
    def _k_q32(x_ptr, w_ptr, b_ptr, out_ptr, B, N, NBK, MAGIC,
               TS: gl.constexpr, QS: gl.constexpr, BITS: gl.constexpr, OFF: gl.constexpr,
               HAS_MIN: gl.constexpr, QH: gl.constexpr, XD: gl.constexpr,
               BN: gl.constexpr, BP: gl.constexpr, KB: gl.constexpr, TI: gl.constexpr, NW: gl.constexpr):
        """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: G = KB blocks of 32 weights, 2*BITS quant words each.

        w_ptr: the blocks as int16 words (fp16 d at word 0, m at 1); qs at byte QS; Q5: the 32-bit
        qh at byte QH, bit j = 5th bit of weight j. 4-bit: qs byte c = weights c (low nibble) and
        c + 16 (high). Q8_0: int8, MAGIC flips the sign bit: v = q + 128 (OFF 128)."""
        L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1], [32 // TI, 1, 1, TI], [NW, 1, 1, 1], [3, 0, 1, 2])
        SPT: gl.constexpr = 2 * BITS // TI
        NH: gl.constexpr = 8 // BITS  # x pair loads per word
        TSW: gl.constexpr = TS // 2
        VB: gl.constexpr = BITS + 1 * (QH > 0)
        AT: gl.constexpr = 23 - VB
        pid = gl.program_id(0)
        wrow = gl.minimum(pid * BN + _vec(BN, 1, L), N - 1) * (NBK * TSW)  # clamped rows: no load masks
        xrow = gl.minimum(_vec(BP, 2, L), B - 1) * (NBK * 16)
        ti = _vec(TI, 3, L)
        g = _vec(KB, 0, L)
        pd = w_ptr + (wrow + g * TSW)  # [KB, BN, 1, 1] block starts
        pw = pd + (QS // 2 + ti)  # [KB, BN, 1, TI] this thread's first quant word
        px = x_ptr + (xrow + g * 16 + ti)  # [KB, 1, BP, TI] x pairs of that word
        acc = gl.zeros([KB, BN, BP, TI], gl.float32, layout=L)
        for k0 in range(0, NBK, KB):
            a = gl.zeros([KB, BN, BP, TI], gl.float32, layout=L)
            xs = gl.zeros([KB, 1, BP, TI], gl.float32, layout=L)
            qh = pd  # placeholder when there are no high bits
            if QH > 0:
                qh = (gl.load(pd + QH // 2).to(gl.int32) & 0xFFFF) | (gl.load(pd + QH // 2 + 1).to(gl.int32) << 16)
            for s in gl.static_range(SPT):
                qw = gl.load(pw + s * TI).to(gl.int32)
                qs = qh >> (2 * (s * TI + ti)) if QH > 0 else qh  # bit j: 5th bit of column 2w + j
                # 4-bit: value n = byte n//2, high nibble if n odd: column 2w + n//2 + 16*(n%2), so
                # the pair at 2w holds values 0 and 2, the one at 2w+16 values 1 and 3; 8-bit: 0, 1
                for h in gl.static_range(NH):
                    lo, hi = _xpair(gl.load(px + (s * TI + 8 * h)), XD)
                    a = a + _qv(qw, qs, h, BITS, 16 * h if QH > 0 else -1, AT, MAGIC) * lo
                    a = a + _qv(qw, qs, h + NH, BITS, 1 + 16 * h if QH > 0 else -1, AT, MAGIC) * hi
                    xs = xs + (lo + hi)
            # sum((v - OFF) x) = 2^VB sum(f x) - (2^VB + OFF) sum(x);  Q4_1/Q5_1: + m sum(x)
            d = _h(pd)
            cx = d * (-((1 << VB) + OFF))
            if HAS_MIN:
                cx = cx + _h(pd + 1)
            acc = acc + (d * (1 << VB)) * a
            acc = acc + cx * xs
            pd += KB * TSW
            pw += KB * TSW
            px += KB * 16
        _store(out_ptr, acc, pid, B, N, BN, BP, L)

    @gluon.jit
    def _scale_min_k4(pb, s):
        """6-bit scale and min of sub-block s from the 12 packed bytes at pb (ggml's get_scale_min_k4)."""
        p = gl.load(pb + s % 4).to(gl.int32)  # byte s (s < 4) or s-4
        q = gl.load(pb + 4 + s % 4).to(gl.int32)  # byte s+4 (s < 4) or s
        r = gl.load(pb + 8 + s % 4).to(gl.int32)  # byte s+4 (s >= 4)
        lo = s < 4
        sc = gl.where(lo, p & 63, (r & 15) | ((p >> 6) << 4))
        mn = gl.where(lo, q & 63, (r >> 4) | ((q >> 6) << 4))
        return sc.to(gl.float32), mn.to(gl.float32)

    @gluon.jit
    def _k_q45k(x_ptr, w_ptr, b_ptr, out_ptr, B, N, NBK, MAGIC, TS: gl.constexpr, HAS_QH: gl.constexpr,
                XD: gl.constexpr, BN: gl.constexpr, BP: gl.constexpr, KB: gl.constexpr, TI: gl.constexpr,
                NW: gl.constexpr):
        """Q4_K / Q5_K: 256 weights, fp16 d and dmin, 8 sub-blocks with 6-bit scales and mins.

        G = KB*4 chunks of 32 qs bytes (16 words): byte u of chunk c holds weight 64c+u of sub-block
        2c (low nibble) and 64c+32+u of sub-block 2c+1 (high). Q5_K: bit s of qh byte u (qh at byte
        16) is the 5th bit of weight 32s+u."""
        L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1], [32 // TI, 1, 1, TI], [NW, 1, 1, 1], [3, 0, 1, 2])
        G: gl.constexpr = KB * 4
        SPT: gl.constexpr = 16 // TI
        TSW: gl.constexpr = TS // 2
        VB: gl.constexpr = 4 + HAS_QH
        AT: gl.constexpr = 23 - VB
        pid = gl.program_id(0)
        wrow = gl.minimum(pid * BN + _vec(BN, 1, L), N - 1) * (NBK * TSW)
        xrow = gl.minimum(_vec(BP, 2, L), B - 1) * (NBK * 128)
        ti = _vec(TI, 3, L)
        g = _vec(G, 0, L)
        c = g % 4
        pd = w_ptr + (wrow + (g // 4) * TSW)  # [G, BN, 1, 1] block starts
        pb = b_ptr + (2 * (wrow + (g // 4) * TSW) + 4)  # the scale bytes
        pw = pd + ((8 + 16 * HAS_QH) + 16 * c + ti)
        ph = pd + (8 + ti)  # qh words (Q5_K)
        px = x_ptr + (xrow + (g // 4) * 128 + 32 * c + ti)
        acc = gl.zeros([G, BN, BP, TI], gl.float32, layout=L)
        z = gl.zeros([G, BN, BP, TI], gl.float32, layout=L)
        xz = gl.zeros([G, 1, BP, TI], gl.float32, layout=L)
        for k0 in range(0, NBK, KB):
            a0, a1, x0s, x1s = z, z, xz, xz
            for s in gl.static_range(SPT):
                # value n = byte 2w + n//2 of the chunk, high nibble (sub-block 2c+1) if n odd
                qw = gl.load(pw + s * TI).to(gl.int32)
                qh = qw
                if HAS_QH:
                    qh = gl.load(ph + s * TI).to(gl.int32) >> (2 * c)  # bit 8t+h: byte 2w+t, sub-block 2c+h
                x0, x2 = _xpair(gl.load(px + s * TI), XD)  # sub-block 2c: columns 64c + 2w, +1
                x1, x3 = _xpair(gl.load(px + (s * TI + 16)), XD)  # sub-block 2c+1: 64c + 32 + 2w, +1
                a0 = a0 + _qv(qw, qh, 0, 4, 0 if HAS_QH else -1, AT, MAGIC) * x0
                a0 = a0 + _qv(qw, qh, 2, 4, 8 if HAS_QH else -1, AT, MAGIC) * x2
                a1 = a1 + _qv(qw, qh, 1, 4, 1 if HAS_QH else -1, AT, MAGIC) * x1
                a1 = a1 + _qv(qw, qh, 3, 4, 9 if HAS_QH else -1, AT, MAGIC) * x3
                x0s = x0s + (x0 + x2)
                x1s = x1s + (x1 + x3)
            sc0, mn0 = _scale_min_k4(pb, 2 * c)
            sc1, mn1 = _scale_min_k4(pb, 2 * c + 1)
            d = _h(pd) * (1 << VB)
            dmin = _h(pd + 1)
            e0 = d * sc0  # sum(v x) = 2^VB (sum(f x) - sum(x))
            e1 = d * sc1
            acc = acc + e0 * a0
            acc = acc + e1 * a1
            acc = acc - (e0 + dmin * mn0) * x0s
            acc = acc - (e1 + dmin * mn1) * x1s
            pd += KB * TSW
            pb += KB * TS
            pw += KB * TSW
            ph += KB * TSW
            px += KB * 128
        _store(out_ptr, acc, pid, B, N, BN, BP, L)

    @gluon.jit
    def _q6(a, xs, ql, qh, k: gl.constexpr, px, XD: gl.constexpr, MAGIC):
        """Quarter k of a Q6_K position (2 weights; v = 6 bits at 17..22) into a, its x into xs."""
        lo, hi = _xpair(gl.load(px), XD)
        v0 = _place(ql, 4 * (k // 2), 4, 17) | _place(qh, 2 * k, 2, 21)
        v1 = _place(ql, 8 + 4 * (k // 2), 4, 17) | _place(qh, 8 + 2 * k, 2, 21)
        return a + _f(v0, MAGIC) * lo + _f(v1, MAGIC) * hi, xs + (lo + hi)

    @gluon.jit
    def _k_q6k(x_ptr, w_ptr, b_ptr, out_ptr, B, N, NBK, MAGIC, XD: gl.constexpr,
               BN: gl.constexpr, BP: gl.constexpr, KB: gl.constexpr, TI: gl.constexpr, NW: gl.constexpr):
        """Q6_K: 256 weights: ql[128] low nibbles, qh[64] 2-bit highs, 16 int8 scales, fp16 d last.

        Weight 128c + 32k + u (half c, quarter k, u < 32): low 4 bits in ql byte 64c + 32(k%2) + u
        (high nibble if k >= 2), top 2 bits at bit 2k of qh byte 32c + u, scale 8c + 2k + u//16.
        G = KB*4 groups (block, c, u//16); position p < 8 of a group holds u = 16hh + 2p + {0, 1} for
        all four k: ql words 32c+8hh+p and +16, qh word 64+16c+8hh+p (8 weights, 4 scales)."""
        L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1], [32 // TI, 1, 1, TI], [NW, 1, 1, 1], [3, 0, 1, 2])
        G: gl.constexpr = KB * 4
        SPT: gl.constexpr = 8 // TI
        pid = gl.program_id(0)
        wrow = gl.minimum(pid * BN + _vec(BN, 1, L), N - 1) * (NBK * 105)
        xrow = gl.minimum(_vec(BP, 2, L), B - 1) * (NBK * 128)
        ti = _vec(TI, 3, L)
        g = _vec(G, 0, L)
        c = (g // 2) % 2
        hh = g % 2
        pd = w_ptr + (wrow + (g // 4) * 105)
        psc = b_ptr + (2 * (wrow + (g // 4) * 105) + 192 + 8 * c + hh)  # int8 scale of quarter k: + 2k
        pq = pd + (32 * c + 8 * hh + ti)
        ph = pd + (64 + 16 * c + 8 * hh + ti)
        px = x_ptr + (xrow + (g // 4) * 128 + 64 * c + 8 * hh + ti)  # pair of quarter k: + 16k
        acc = gl.zeros([G, BN, BP, TI], gl.float32, layout=L)
        z = gl.zeros([G, BN, BP, TI], gl.float32, layout=L)
        xz = gl.zeros([G, 1, BP, TI], gl.float32, layout=L)
        for k0 in range(0, NBK, KB):
            a0, a1, a2, a3, xs0, xs1, xs2, xs3 = z, z, z, z, xz, xz, xz, xz
            for s in gl.static_range(SPT):
                ql0 = gl.load(pq + s * TI).to(gl.int32)
                ql1 = gl.load(pq + (s * TI + 16)).to(gl.int32)
                qh = gl.load(ph + s * TI).to(gl.int32)
                a0, xs0 = _q6(a0, xs0, ql0, qh, 0, px + s * TI, XD, MAGIC)
                a1, xs1 = _q6(a1, xs1, ql1, qh, 1, px + (s * TI + 16), XD, MAGIC)
                a2, xs2 = _q6(a2, xs2, ql0, qh, 2, px + (s * TI + 32), XD, MAGIC)
                a3, xs3 = _q6(a3, xs3, ql1, qh, 3, px + (s * TI + 48), XD, MAGIC)
            d = _h(pd + 104)
            # sum((v-32) x) = 64 sum(f x) - 96 sum(x), per quarter's int8 scale
            s0 = d * gl.load(psc).to(gl.int8, bitcast=True).to(gl.float32)
            s1 = d * gl.load(psc + 2).to(gl.int8, bitcast=True).to(gl.float32)
            s2 = d * gl.load(psc + 4).to(gl.int8, bitcast=True).to(gl.float32)
            s3 = d * gl.load(psc + 6).to(gl.int8, bitcast=True).to(gl.float32)
            acc = acc + (s0 * 64.0) * a0 - (s0 * 96.0) * xs0
            acc = acc + (s1 * 64.0) * a1 - (s1 * 96.0) * xs1
            acc = acc + (s2 * 64.0) * a2 - (s2 * 96.0) * xs2
            acc = acc + (s3 * 64.0) * a3 - (s3 * 96.0) * xs3
            pd += KB * 105
            psc += KB * 210
            pq += KB * 105
            ph += KB * 105
            px += KB * 128
        _store(out_ptr, acc, pid, B, N, BN, BP, L)


# per type: kernel arguments (block layouts; see the kernels' docstrings)
_Q32 = {
    QType.Q4_0: dict(TS=18, QS=2, BITS=4, OFF=8, HAS_MIN=0, QH=0),
    QType.Q4_1: dict(TS=20, QS=4, BITS=4, OFF=0, HAS_MIN=1, QH=0),
    QType.Q5_0: dict(TS=22, QS=6, BITS=4, OFF=16, HAS_MIN=0, QH=2),
    QType.Q5_1: dict(TS=24, QS=8, BITS=4, OFF=0, HAS_MIN=1, QH=4),
    QType.Q8_0: dict(TS=34, QS=2, BITS=8, OFF=128, HAS_MIN=0, QH=0),
}
_XD = {torch.float16: (0, torch.int32), torch.bfloat16: (1, torch.int32), torch.float32: (2, torch.int64)}


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n: the K loop then needs no mask."""
    k = 1
    while k * 2 <= cap and n % (k * 2) == 0:
        k *= 2
    return k


def config(qtype: QType, n_rows: int, n_cols: int, batch: int) -> tuple[int, int, int, int]:
    """(BN rows per program, KB blocks per step, TI threads per group, num_warps): shape only.

    From tools/bench_gemv.py --sweep on an H100. KB (x4 for K-quants) should cover the 32/TI*num_warps
    lanes (smaller is correct but replicates work). Batches favour many rows per program (each x
    value converted once serves BN rows) over registers; >= 256 programs keep the SMs busy."""
    if QTYPE_INFO[qtype].block_size == 256:
        bn, kb, ti, nw = 4, 8, 4, 4
    elif batch == 1 and qtype != QType.Q8_0:  # 4-bit, 32-weight blocks
        bn, kb, ti, nw = (8, 64, 2, 4) if n_rows >= 2048 else (2, 64, 4, 8)
    else:
        bn, kb, ti, nw = 8 if batch <= 4 else 4, 32, 4, 4
    while bn > 1 and n_rows // bn < 256:
        bn //= 2
    return bn, kb, ti, nw


_fast = [FastLaunch(k) for k in (_k_q32, _k_q45k, _k_q6k)] if HAVE_GLUON else []


def _launch(x: torch.Tensor, flat: torch.Tensor, qtype: QType, n_rows: int, n_cols: int, out: torch.Tensor,
            cfg: tuple[int, int, int, int] | None = None) -> None:
    b = x.shape[0]
    info = QTYPE_INFO[qtype]
    nbk = n_cols // info.block_size
    bn, kb, ti, nw = cfg or config(qtype, n_rows, n_cols, b)
    ti = min(ti, 8 if qtype in _Q32 and qtype != QType.Q8_0 or qtype == QType.Q6_K else 16)  # <= words/group
    kw = dict(XD=_XD[x.dtype][0], BN=bn, BP=triton.next_power_of_2(b), KB=pow2_divisor(nbk, kb), TI=ti,
              NW=nw, num_warps=nw)
    args = (x.view(_XD[x.dtype][1]), flat.view(torch.uint16), flat, out, b, n_rows, nbk)  # u16: no sign-extend
    grid = (triton.cdiv(n_rows, bn),)
    if qtype in _Q32:
        magic = _ONE ^ (0x80 << 15) if qtype == QType.Q8_0 else _ONE  # Q8_0: int8 -> q + 128
        _fast[0](grid, *args, magic, **_Q32[qtype], **kw)
    elif qtype in (QType.Q4_K, QType.Q5_K):
        _fast[1](grid, *args, _ONE, TS=info.type_size, HAS_QH=int(qtype == QType.Q5_K), **kw)
    else:
        _fast[2](grid, *args, _ONE, **kw)


def gemv(x: torch.Tensor, blocks: torch.Tensor, qtype: QType, n_rows: int, n_cols: int,
         out: torch.Tensor | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """y = x @ W^T, (B, n_cols) x (n_rows, n_cols) -> (B, n_rows) in x's dtype, fp32 accumulation.

    blocks: uint8 GGUF blocks of W, (n_rows, row_bytes) or flat, contiguous, start 2-byte aligned
    (16 for the fastest code), under 2 GiB (int32 offsets). B <= MAX_BATCH per launch; a larger B
    is split. use_kernel: None = Gluon on CUDA tensors; False (or no Gluon) = dequantize + matmul."""
    qtype = QType(qtype)
    if qtype not in GEMV_TYPES:
        raise ValueError(f"gemv supports {sorted(t.name for t in GEMV_TYPES)}, found {qtype.name}")
    info = QTYPE_INFO[qtype]
    if n_cols % info.block_size:
        raise ValueError(f"{qtype.name} rows need a multiple of {info.block_size} values, found {n_cols}")
    flat = blocks.reshape(-1)
    if flat.dtype != torch.uint8 or not flat.is_contiguous():
        raise ValueError("blocks must be contiguous uint8")
    if flat.numel() != (need := n_rows * (n_cols // info.block_size) * info.type_size):
        raise ValueError(f"{qtype.name} {n_rows}x{n_cols} needs {need} bytes, found {flat.numel()}")
    if x.dim() != 2 or x.shape[1] != n_cols:
        raise ValueError(f"x must be (B, {n_cols}), found {tuple(x.shape)}")
    x = x.contiguous()
    bsz = x.shape[0]
    if out is None:
        out = torch.empty((bsz, n_rows), dtype=x.dtype, device=x.device)
    elif out.shape != (bsz, n_rows) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(bsz, n_rows)} tensor, found {tuple(out.shape)}")
    if bsz == 0 or n_rows == 0:
        return out
    if use_kernel is None:
        use_kernel = HAVE_GLUON and flat.is_cuda
    if not use_kernel:
        w = ck.dequantize(flat, qtype, n_cols, dtype=torch.float32, use_triton=False)
        out.copy_(x.float() @ w.t())
        return out
    if flat.data_ptr() % 2 or x.dtype not in _XD or flat.numel() >= 2 ** 31:
        raise ValueError("blocks must start 2-byte aligned and be under 2 GiB; x must be fp16, bf16 or fp32")
    for s in range(0, bsz, MAX_BATCH):  # shapes only: the same launches every call (graph safe)
        _launch(x[s:s + MAX_BATCH], flat, qtype, n_rows, n_cols, out[s:s + MAX_BATCH])
    return out
