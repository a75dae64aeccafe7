"""Row dots of the nibble layouts with fp16 scales, AVX2 LLVM IR through numba @intrinsic, one token
or four at a time: "nibw" (Q4_0, Q4_1) and "nib5h" (Q5_0, Q5_1), built by weights.pack().

Why fp16: the scales are fp16 in the file, so they stay exact, and a Q4_1 block reads 20 bytes (16
nibbles + d + m) instead of 24 with float32 scales (SmolLM2's layer weights: 79.7 -> 66.4 MB per
token). Q4_0/Q5_0 store no m: m = mmul*d (mmul -8 / -16, a runtime argument; 1 with a stored m),
summed as d*xs and scaled once after the loop, as blocks.py does.

Why "nibw" (word order: 16-bit word k of a block holds values k, k+8, k+16, k+24 in its 4 nibbles):
three shifts and three masks give the 32 values as four <8 x i16> in order, ready for vpmaddwd with
the int16 activations; the GGUF byte order needs masks plus two vpmovzxbw to widen. On this 2-core
EPYC (Zen: a 256-bit op is two 128-bit uops) the row dot went from ~4.2 to ~3.0 ns per block, and
the kernels were the decode step's bound as much as the memory. The 5-bit types keep the byte order
(their high-bit word maps onto it).

Per group of 4 blocks one vcvtph2ps and one vmulps give the blocks' d*xd, and the m term is a
separate 4-lane FMA loop. The 4-bit layout takes a group's blocks two at a time in 256-bit ops
(int16 activations: vpmaddwd; int8: vpdpbusd with VNNI, else vpmaddubsw + vpmaddwd), block A's
sums in lanes 0-3 and B's in 4-7, one 8-lane FMA per pair and token; quant_row / quant_row8 store
the activations in the same pairwise order (matmul_int.ACT_*), so each operand is one load. On Zen
5 and the Xeons (whole 256-bit ops) that made the serve engine's 8-token steps ~1.5x faster and a
Q4_0 head ~1.5x; on Zen 1 a 256-bit op is two 128-bit ones. The 5-bit layout keeps 4-lane pieces
per block, two accumulators alternating (the FMA latency is not the bound). The rest of a row (nb
% 4 blocks) goes block by block. A token's arithmetic does not depend on how many tokens share the
call (1 or 4): the 4-token dot is bitwise the 1-token one.
"""
from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .llvm_ir import (F16, F32, I8, I16, V4F, V4I32, V8F, V8I16, V8I32, V16I16, V32I8, array_data, byte_nibbles,
                      counted_loop, declare, dot_bytes, hsum4, i64, nibbles, prefetch, splat, with_high_bits,
                      HAVE_VNNI)

V4H = ir.VectorType(F16, 4)
G = 4  # blocks per group: their 4 scales in one vcvtph2ps / vmulps (xmm: whole uops on this Zen)
# Software prefetch distance of the 4-bit layouts' row dots, in bytes of nibbles ahead (0: none). Why:
# the decode GEMVs stream weights once from DRAM; a core's hardware prefetcher stops at each 4 KiB page
# and runs a short way ahead, so a core reads far below its share of the host's bandwidth.
PF_BYTES = int(os.environ.get("LSTREAM_CPU_PREFETCH", "2048"))
N4 = 4  # tokens of the multi-token dot (matmul_multi.N_MULTI)


def _typed(builder, p, ty):
    return builder.bitcast(p, ty.as_pointer())


def word_nibbles(builder, p):
    """16 bytes at p in word order -> values 0-7, 8-15, 16-23, 24-31 as four <8 x i16>."""
    qv = builder.load(_typed(builder, p, V8I16), align=1)
    c15 = ir.Constant(V8I16, [15] * 8)
    sh = [builder.lshr(qv, ir.Constant(V8I16, [k] * 8)) for k in (4, 8, 12)]
    return [builder.and_(qv, c15), builder.and_(sh[0], c15), builder.and_(sh[1], c15), sh[2]]


def row_dots(builder, q_p, qh_p, d_p, m_p, xq, xd, xs, rb, nb, mmul, act8=False):
    """Generated LLVM IR: row rb/nb dotted with each token's (xq, xd, xs) (lists of per-token pointers
    to int16 / float32 / float32): a list of float32, one per token. qh_p None: 4-bit nibbles in word order ("nibw");
    else 5-bit, GGUF byte order with the uint32 high-bit words at qh_p ("nib5h"). d_p, m_p:
    byte pointers to the fp16 scales; mmul: float32 multiplier of the m sum. act8 ("nibw" only): xq
    holds int8 activations in nib_i8's block order, multiplied by vpmaddubsw (nib_i8.py)."""
    n = len(xq)
    d_h, m_h = _typed(builder, d_p, F16), _typed(builder, m_p, F16)
    xq = [_typed(builder, p, I8 if act8 else I16) for p in xq]
    xd = [_typed(builder, p, F32) for p in xd]
    xs = [_typed(builder, p, F32) for p in xs]
    pmadd4 = declare(builder, "llvm.x86.sse2.pmadd.wd", V4I32, [V8I16, V8I16])
    pmadd8 = declare(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16])
    fma = declare(builder, "llvm.fma.v4f32", V4F, [V4F] * 3)
    zero4, zero = ir.Constant(V4F, [0.0] * 4), ir.Constant(F32, 0.0)
    ng = builder.ashr(nb, i64(2))
    ng_b = builder.shl(ng, i64(2))
    undef4 = ir.Constant(V4F, ir.Undefined)

    def weights(wb):
        if act8:
            return byte_nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))
        if qh_p is None:
            return word_nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))
        lo, hi = nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))
        lo, hi = with_high_bits(builder, lo, hi, builder.load(builder.gep(qh_p, [wb])))
        return [builder.zext(lo, V16I16), builder.zext(hi, V16I16)]

    def prod(ws, t, i):  # sum over the block of q * xq as 4 float lanes (exact: |.| < 2^24)
        xp = builder.gep(xq[t], [builder.mul(i, i64(32))])
        if act8:
            return dot_bytes(builder, ws, xp)
        if qh_p is None:
            xv = _typed(builder, xp, V8I16)
            ps = [builder.call(pmadd4, [w, builder.load(builder.gep(xv, [i64(k)]), align=2)]) for k, w in enumerate(ws)]
            p = builder.add(builder.add(ps[0], ps[1]), builder.add(ps[2], ps[3]))
        else:
            xv = _typed(builder, xp, V16I16)
            p8 = builder.add(builder.call(pmadd8, [ws[0], builder.load(xv, align=2)]),
                             builder.call(pmadd8, [ws[1], builder.load(builder.gep(xv, [i64(1)]), align=2)]))
            half = [builder.shuffle_vector(p8, p8, ir.Constant(V4I32, list(range(k, k + 4)))) for k in (0, 4)]
            p = builder.add(half[0], half[1])
        return builder.sitofp(p, V4F)

    def f16x4(p, i):
        return builder.fpext(builder.load(_typed(builder, builder.gep(p, [i]), V4H), align=2), V4F)

    def f32x4(p, i):
        return builder.load(_typed(builder, builder.gep(p, [i]), V4F), align=4)

    def group(g, *accs):  # blocks 4g .. 4g+3; accs: (even, odd) accumulator per token
        base = builder.shl(g, i64(2))
        d4 = f16x4(d_h, builder.add(rb, base))
        s4 = [builder.fmul(d4, f32x4(xd[t], base)) for t in range(n)]
        accs = list(accs)
        for j in range(G):
            i = builder.add(base, i64(j))
            ws = weights(builder.add(rb, i))
            lane = ir.Constant(V4I32, [j] * 4)
            for t in range(n):
                k = 2 * t + (j & 1)
                accs[k] = builder.call(fma, [prod(ws, t, i), builder.shuffle_vector(s4[t], undef4, lane), accs[k]])
        return accs

    pairs = act8 or qh_p is None  # the 4-bit layouts: a group's blocks two at a time in 256-bit ops
    if pairs:
        mub8 = declare(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, [V32I8, V32I8])
        fma8 = declare(builder, "llvm.fma.v8f32", V8F, [V8F] * 3)
        ones16 = ir.Constant(V16I16, [1] * 16)
        dpbusd = declare(builder, "llvm.x86.avx512.vpdpbusd.256", V8I32, [V8I32] * 3) if HAVE_VNNI else None
        zero8i = ir.Constant(V8I32, [0] * 8)
        c15b, c15w = ir.Constant(V32I8, [15] * 32), ir.Constant(V16I16, [15] * 16)

        def pair_weights(qv):  # blocks A, B (16 bytes each, one per 128-bit lane) -> per-lane values
            if act8:  # byte_nibbles per lane
                hi = builder.lshr(builder.bitcast(qv, V16I16), ir.Constant(V16I16, [4] * 16))
                return [builder.and_(qv, c15b), builder.and_(builder.bitcast(hi, V32I8), c15b)]
            w = builder.bitcast(qv, V16I16)  # word_nibbles per lane: values 0-7, 8-15, 16-23, 24-31
            sh = [builder.lshr(w, ir.Constant(V16I16, [k] * 16)) for k in (4, 8, 12)]
            return [builder.and_(w, c15w), builder.and_(sh[0], c15w), builder.and_(sh[1], c15w), sh[2]]

        def pair_sums(ws, t, i):  # int32 x 8: lanes 0-3 block A's sums as prod() makes them, 4-7 block B's
            if act8:  # the pair's activations: A's and B's first 16 bytes, then their second 16 (quant_row8)
                xp = _typed(builder, builder.gep(xq[t], [builder.mul(i, i64(32))]), V32I8)
                xlo, xhi = builder.load(xp, align=1), builder.load(builder.gep(xp, [i64(1)]), align=1)
                if HAVE_VNNI:  # the same int32 sums (4 adjacent bytes each, lo + hi) in two ops
                    i32 = [builder.bitcast(v, V8I32) for v in (ws[0], xlo, ws[1], xhi)]
                    return builder.call(dpbusd, [builder.call(dpbusd, [zero8i] + i32[:2])] + i32[2:])
                p16 = builder.add(builder.call(mub8, [ws[0], xlo]), builder.call(mub8, [ws[1], xhi]))
                return builder.call(pmadd8, [p16, ones16])
            # int16, paired by quant_row: chunk k (8 values) of A then of B, 16 values per 256-bit load
            xp = _typed(builder, builder.gep(xq[t], [builder.mul(i, i64(32))]), V16I16)
            ps = [builder.call(pmadd8, [w, builder.load(builder.gep(xp, [i64(k)]), align=2)]) for k, w in enumerate(ws)]
            return builder.add(builder.add(ps[0], ps[1]), builder.add(ps[2], ps[3]))

        def group8(g, *acc8):  # blocks 4g .. 4g+3 two at a time
            base = builder.shl(g, i64(2))
            if PF_BYTES:  # a group is one cache line of nibbles; its scales 8 bytes (the line PF/8 ahead)
                blk = builder.add(rb, base)
                prefetch(builder, builder.gep(q_p, [builder.add(builder.mul(blk, i64(16)), i64(PF_BYTES))]))
                prefetch(builder, builder.gep(d_p, [builder.add(builder.mul(blk, i64(2)), i64(PF_BYTES // 8))]))
            d4 = f16x4(d_h, builder.add(rb, base))
            s4 = [builder.fmul(d4, f32x4(xd[t], base)) for t in range(n)]
            acc8 = list(acc8)
            for pair in (0, 1):
                i = builder.add(base, i64(2 * pair))
                qv = builder.load(_typed(builder, builder.gep(q_p, [builder.mul(builder.add(rb, i), i64(16))]), V32I8),
                                  align=1)
                ws = pair_weights(qv)
                lane = ir.Constant(V8I32, [2 * pair] * 4 + [2 * pair + 1] * 4)
                for t in range(n):
                    sc = builder.shuffle_vector(s4[t], undef4, lane)
                    acc8[t] = builder.call(fma8, [builder.sitofp(pair_sums(ws, t, i), V8F), sc, acc8[t]])
            return acc8

        acc8 = counted_loop(builder, ng, [ir.Constant(V8F, [0.0] * 8)] * n, group8, "hdot8")
        accs = [zero4] * (2 * n)  # the tail starts from zero
    else:
        accs = counted_loop(builder, ng, [zero4] * (2 * n), group, "hdot")

    def tail(k, *acc):  # the last nb % 4 blocks, one at a time, into the even accumulators
        i = builder.add(ng_b, k)
        wb = builder.add(rb, i)
        ws = weights(wb)
        d = builder.fpext(builder.load(builder.gep(d_h, [wb])), F32)
        return [builder.call(fma, [prod(ws, t, i), splat(builder, builder.fmul(d, builder.load(builder.gep(
            xd[t], [i]))), 4), acc[t]]) for t in range(n)]

    ev = counted_loop(builder, builder.sub(nb, ng_b), [accs[2 * t] for t in range(n)], tail, "hdot.tail")

    def mgroup(g, *macc):
        base = builder.shl(g, i64(2))
        m4 = f16x4(m_h, builder.add(rb, base))
        return [builder.call(fma, [m4, f32x4(xs[t], base), macc[t]]) for t in range(n)]

    mv = counted_loop(builder, ng, [zero4] * n, mgroup, "hdot.m")

    def mtail(k, *ms):
        i = builder.add(ng_b, k)
        mw = builder.fpext(builder.load(builder.gep(m_h, [builder.add(rb, i)])), F32)
        return [builder.fadd(ms[t], builder.fmul(mw, builder.load(builder.gep(xs[t], [i])))) for t in range(n)]

    ms = counted_loop(builder, builder.sub(nb, ng_b), [zero] * n, mtail, "hdot.mt")
    out = []
    for t in range(n):
        if pairs:  # the pairs' first and second blocks, then the tail
            lo8 = builder.shuffle_vector(acc8[t], acc8[t], ir.Constant(V4I32, [0, 1, 2, 3]))
            hi8 = builder.shuffle_vector(acc8[t], acc8[t], ir.Constant(V4I32, [4, 5, 6, 7]))
            a = hsum4(builder, builder.fadd(builder.fadd(lo8, hi8), ev[t]))
        else:
            a = hsum4(builder, builder.fadd(ev[t], accs[2 * t + 1]))
        out.append(builder.fadd(a, builder.fmul(mmul, builder.fadd(hsum4(builder, mv[t]), ms[t]))))
    return out


def _gen_one(five: bool, act8: bool = False):
    """codegen: (q, [qh,] d, m, xq, xd, xs, (rb, nb), mmul) -> float32, rows 1-D."""

    def codegen(context, builder, sig, args):
        sa, args = list(sig.args), list(args)
        qh_p = None
        if five:
            qh_p = array_data(context, builder, sa[1], args[1])
            del sa[1], args[1]
        ptr = [array_data(context, builder, t, a) for t, a in zip(sa[:6], args[:6])]
        rb, nb = builder.extract_value(args[6], 0), builder.extract_value(args[6], 1)
        return row_dots(builder, ptr[0], qh_p, ptr[1], ptr[2], [ptr[3]], [ptr[4]], [ptr[5]], rb, nb, args[7],
                        act8)[0]

    return codegen


@intrinsic
def dot_nibw_row(typingctx, q, d, m, xq, xd, xs, off, mmul):
    """sum_b d[rb+b]*xd[b]*dot(values of block rb+b, xq[b]) + mmul * sum_b m[rb+b]*xs[b], off = (rb, nb);
    d, m: the fp16 scales as bytes (uint8 arrays)."""
    if mmul != types.float32:
        return None
    return types.float32(q, d, m, xq, xd, xs, off, mmul), _gen_one(False)


@intrinsic
def dot_nib5h_row(typingctx, q, qh, d, m, xq, xd, xs, off, mmul):
    """Like dot_nibw_row with 5-bit values in GGUF byte order: bit j of qh[rb+b] (uint32) adds 16 to value j."""
    if mmul != types.float32:
        return None
    return types.float32(q, qh, d, m, xq, xd, xs, off, mmul), _gen_one(True)


def _row_ptrs(context, builder, aty, aval, t0, n: int):
    """Pointers to rows t0 .. t0+n-1 of a 2-D array (its own row stride, in bytes)."""
    arr = context.make_array(aty)(context, builder, aval)
    stride = builder.extract_value(arr.strides, 0)
    base = builder.bitcast(arr.data, I8.as_pointer())
    return [builder.gep(base, [builder.mul(builder.add(t0, i64(j)), stride)]) for j in range(n)]


def _gen_four(act8: bool):
    """codegen: (q, d, m, xq, xd, xs, t0, (rb, nb), mmul) -> UniTuple(float32, 4), rows t0..t0+3."""

    def codegen(context, builder, sig, args):
        sa = sig.args
        q_p, d_p, m_p = (array_data(context, builder, sa[k], args[k]) for k in range(3))
        t0 = args[6]
        xq, xd, xs = (_row_ptrs(context, builder, sa[k], args[k], t0, N4) for k in (3, 4, 5))
        rb, nb = builder.extract_value(args[7], 0), builder.extract_value(args[7], 1)
        vals = row_dots(builder, q_p, None, d_p, m_p, xq, xd, xs, rb, nb, args[8], act8)
        return context.make_tuple(builder, sig.return_type, vals)

    return codegen


@intrinsic
def dot4_nibw(typingctx, q, d, m, xq, xd, xs, t0, off, mmul):
    """Rows t0..t0+3 of (xq, xd, xs) dotted with weight row off = (rb, nb): 4 x dot_nibw_row, bitwise."""
    if mmul != types.float32:
        return None
    return types.UniTuple(types.float32, N4)(q, d, m, xq, xd, xs, t0, off, mmul), _gen_four(False)


# int8 activations (nib_i8 block order, in the first half of each int16 row of xq): the same sums
# with two vpmaddubsw + one vpmaddwd per block and token instead of four vpmaddwd (Zen 1 multiplies
# vectors of integers on one pipe only: that count bounds these kernels)
@intrinsic
def dot_nibw8_row(typingctx, q, d, m, xq, xd, xs, off, mmul):
    """dot_nibw_row with int8 activations (matmul_int.quant_row8)."""
    if mmul != types.float32:
        return None
    return types.float32(q, d, m, xq, xd, xs, off, mmul), _gen_one(False, True)


@intrinsic
def dot4_nibw8(typingctx, q, d, m, xq, xd, xs, t0, off, mmul):
    """dot4_nibw with int8 activations: 4 x dot_nibw8_row, bitwise."""
    if mmul != types.float32:
        return None
    return types.UniTuple(types.float32, N4)(q, d, m, xq, xd, xs, t0, off, mmul), _gen_four(True)
