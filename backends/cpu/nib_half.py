"""Row dots of the nibble layouts with fp16 scales (Q4_0, Q4_1, Q5_0, Q5_1 repacked: layout "nib" /
"nib5" with d, m float16), AVX2 LLVM IR through numba @intrinsic, one token or four at a time.

Why fp16: the scales are fp16 in the file, so they stay exact, and a Q4_1 block reads 20 bytes (16
nibbles + d + m) instead of 24 with float32 scales: SmolLM2 decode is memory-bound (79.7 -> 66.4 MB
of layer weights per token). Q4_0/Q5_0 store no m at all: m = mmul*d (mmul -8 / -16, a runtime
argument; 1 with a stored m), summed as d*xs and scaled once after the loop, as blocks.py does.

The scales are handled 8 blocks at a time: one vcvtph2ps and one vmulps give the 8 blocks' d*xd, a
lane splat per block feeds its FMA, and the m term is a separate 8-lane FMA loop (no scalar chain
per block); blocks alternate between two accumulators so the FMA latency is not the loop's bound.
The rest of a row (nb % 8 blocks) goes block by block. A token's arithmetic does not depend on how
many tokens share the call (1 or 4), so the 4-token dot is bitwise the 1-token one.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .llvm_ir import (F16, F32, I8, I16, I32, V8F, V8I32, V16I16, array_data, counted_loop, declare, hsum8,
                      i64, nibbles, splat, with_high_bits)

V8H = ir.VectorType(F16, 8)
N4 = 4  # tokens of the multi-token dot (matmul_multi.N_MULTI)


def _typed(builder, p, ty):
    return builder.bitcast(p, ty.as_pointer())


def row_dots(builder, q_p, qh_p, d_p, m_p, xq, xd, xs, rb, nb, mmul):
    """Row rb/nb of the layout dotted with each token's (xq, xd, xs) (lists of per-token pointers to
    int16 / float32 / float32): a list of float32, one per token. d_p, m_p: byte pointers to the fp16
    scales; qh_p: uint32 high-bit words or None (4-bit); mmul: float32 multiplier of the m sum."""
    n = len(xq)
    d_h, m_h = _typed(builder, d_p, F16), _typed(builder, m_p, F16)
    xq = [_typed(builder, p, I16) for p in xq]
    xd = [_typed(builder, p, F32) for p in xd]
    xs = [_typed(builder, p, F32) for p in xs]
    pmaddwd = declare(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16])
    fma = declare(builder, "llvm.fma.v8f32", V8F, [V8F, V8F, V8F])
    zero8, zero = ir.Constant(V8F, [0.0] * 8), ir.Constant(F32, 0.0)
    ng = builder.ashr(nb, i64(3))
    n8 = builder.shl(ng, i64(3))
    undef8 = ir.Constant(V8F, ir.Undefined)

    def weights(wb):
        lo, hi = nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))
        if qh_p is not None:
            lo, hi = with_high_bits(builder, lo, hi, builder.load(builder.gep(qh_p, [wb])))
        return builder.zext(lo, V16I16), builder.zext(hi, V16I16)

    def prod(w0, w1, t, i):  # sum over the block of q * xq, as 8 float lanes (exact: < 2^24)
        xp = _typed(builder, builder.gep(xq[t], [builder.mul(i, i64(32))]), V16I16)
        p0 = builder.call(pmaddwd, [w0, builder.load(xp, align=2)])
        p1 = builder.call(pmaddwd, [w1, builder.load(builder.gep(xp, [i64(1)]), align=2)])
        return builder.sitofp(builder.add(p0, p1), V8F)

    def f16x8(p, i):
        return builder.fpext(builder.load(_typed(builder, builder.gep(p, [i]), V8H), align=2), V8F)

    def f32x8(p, i):
        return builder.load(_typed(builder, builder.gep(p, [i]), V8F), align=4)

    def group(g, *accs):  # blocks 8g .. 8g+7; accs: (even, odd) accumulator per token
        base = builder.shl(g, i64(3))
        d8 = f16x8(d_h, builder.add(rb, base))
        s8 = [builder.fmul(d8, f32x8(xd[t], base)) for t in range(n)]
        accs = list(accs)
        for j in range(8):
            i = builder.add(base, i64(j))
            w0, w1 = weights(builder.add(rb, i))
            lane = ir.Constant(ir.VectorType(I32, 8), [j] * 8)
            for t in range(n):
                sc = builder.shuffle_vector(s8[t], undef8, lane)
                k = 2 * t + (j & 1)
                accs[k] = builder.call(fma, [prod(w0, w1, t, i), sc, accs[k]])
        return accs

    accs = counted_loop(builder, ng, [zero8] * (2 * n), group, "hdot")

    def tail(k, *acc):  # the last nb % 8 blocks, one at a time, into the even accumulators
        i = builder.add(n8, k)
        wb = builder.add(rb, i)
        w0, w1 = weights(wb)
        d = builder.fpext(builder.load(builder.gep(d_h, [wb])), F32)
        return [builder.call(fma, [prod(w0, w1, t, i), splat(builder, builder.fmul(d, builder.load(builder.gep(
            xd[t], [i]))), 8), acc[t]]) for t in range(n)]

    ev = counted_loop(builder, builder.sub(nb, n8), [accs[2 * t] for t in range(n)], tail, "hdot.tail")

    def mgroup(g, *macc):
        base = builder.shl(g, i64(3))
        m8 = f16x8(m_h, builder.add(rb, base))
        return [builder.call(fma, [m8, f32x8(xs[t], base), macc[t]]) for t in range(n)]

    mv = counted_loop(builder, ng, [zero8] * n, mgroup, "hdot.m")

    def mtail(k, *ms):
        i = builder.add(n8, k)
        mw = builder.fpext(builder.load(builder.gep(m_h, [builder.add(rb, i)])), F32)
        return [builder.fadd(ms[t], builder.fmul(mw, builder.load(builder.gep(xs[t], [i])))) for t in range(n)]

    ms = counted_loop(builder, builder.sub(nb, n8), [zero] * n, mtail, "hdot.mt")
    out = []
    for t in range(n):
        a = hsum8(builder, builder.fadd(ev[t], accs[2 * t + 1]))
        out.append(builder.fadd(a, builder.fmul(mmul, builder.fadd(hsum8(builder, mv[t]), ms[t]))))
    return out


def _gen_one(five: bool):
    """codegen: (q, [qh,] d, m, xq, xd, xs, (rb, nb), mmul) -> float32, rows 1-D."""

    def codegen(context, builder, sig, args):
        sa, args = list(sig.args), list(args)
        qh_p = None
        if five:
            qh_p = array_data(context, builder, sa[1], args[1])
            del sa[1], args[1]
        ptr = [array_data(context, builder, t, a) for t, a in zip(sa[:6], args[:6])]
        rb, nb = builder.extract_value(args[6], 0), builder.extract_value(args[6], 1)
        return row_dots(builder, ptr[0], qh_p, ptr[1], ptr[2], [ptr[3]], [ptr[4]], [ptr[5]], rb, nb, args[7])[0]

    return codegen


@intrinsic
def dot_nibh_row(typingctx, q, d, m, xq, xd, xs, off, mmul):
    """sum_b d[rb+b]*xd[b]*dot(nibbles of block rb+b, xq[b]) + mmul * sum_b m[rb+b]*xs[b], off = (rb, nb);
    d, m: the fp16 scales as bytes (uint8 arrays)."""
    if mmul != types.float32:
        return None
    return types.float32(q, d, m, xq, xd, xs, off, mmul), _gen_one(False)


@intrinsic
def dot_nib5h_row(typingctx, q, qh, d, m, xq, xd, xs, off, mmul):
    """Like dot_nibh_row with 5-bit values: bit j of qh[rb+b] (uint32) adds 16 to value j."""
    if mmul != types.float32:
        return None
    return types.float32(q, qh, d, m, xq, xd, xs, off, mmul), _gen_one(True)


def _row_ptrs(context, builder, aty, aval, t0, n: int):
    """Pointers to rows t0 .. t0+n-1 of a 2-D array (its own row stride, in bytes)."""
    arr = context.make_array(aty)(context, builder, aval)
    stride = builder.extract_value(arr.strides, 0)
    base = builder.bitcast(arr.data, I8.as_pointer())
    return [builder.gep(base, [builder.mul(builder.add(t0, i64(j)), stride)]) for j in range(n)]


def _gen_four(context, builder, sig, args):
    """codegen: (q, d, m, xq, xd, xs, t0, (rb, nb), mmul) -> UniTuple(float32, 4), rows t0..t0+3."""
    sa = sig.args
    q_p, d_p, m_p = (array_data(context, builder, sa[k], args[k]) for k in range(3))
    t0 = args[6]
    xq, xd, xs = (_row_ptrs(context, builder, sa[k], args[k], t0, N4) for k in (3, 4, 5))
    rb, nb = builder.extract_value(args[7], 0), builder.extract_value(args[7], 1)
    vals = row_dots(builder, q_p, None, d_p, m_p, xq, xd, xs, rb, nb, args[8])
    return context.make_tuple(builder, sig.return_type, vals)


@intrinsic
def dot4_nibh(typingctx, q, d, m, xq, xd, xs, t0, off, mmul):
    """Rows t0..t0+3 of (xq, xd, xs) dotted with weight row off = (rb, nb): 4 x dot_nibh_row, bitwise."""
    if mmul != types.float32:
        return None
    return types.UniTuple(types.float32, N4)(q, d, m, xq, xd, xs, t0, off, mmul), _gen_four
