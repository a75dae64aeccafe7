"""AVX2 dot products and dequantization on the GGUF blocks themselves (layout "blk": Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0), LLVM IR; run inside the matmul drivers for types packed in place (Q8_0 by default)."""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ...core.qtypes import QType
from .jit import INLINE
from .llvm_ir import (F16, F32, I32, V8F, V8I32, V16F, V16I16, array_data, counted_loop, declare, f16_at, hsum8, i64,
                      load_i8x32, nibbles, splat, with_high_bits)

# Decode is memory-bound once the weights do not fit in the caches (SmolLM2 reads ~110 MB per
# token): the repacked layouts (16 B nibbles + f32 d + f32 m per 32, three separate streams) read
# 0.75 B/weight for Q4_1 where the GGUF block (fp16 d, fp16 m, 16 B nibbles: 20 B) reads 0.625.  The
# GGUF nibble order (byte j: weight j low, weight j+16 high) and the Q5 high-bit word (bit j -> weight
# j) are already what the AVX2 dot products want, so these types are used in place, one stream, fp16
# scales converted in the kernel (F16C vcvtph2ps).
#
#     type  bytes  d    m            qh   qs
#     Q4_0  18     0    -8d          -    2
#     Q4_1  20     0    2            -    4
#     Q5_0  22     0    -16d         2    6
#     Q5_1  24     0    2            4    8
#     Q8_0  34     0    -            -    2 (int8)
#
# Row r, block b starts at byte (r*nb + b) * bytes.  The activations are the int16 per-32 blocks of
# simd.py (xq, xd, xs = xd*sum(xq)).

# name -> (bytes per block, m offset (-1: m = mmul*d), mmul, qh offset (-1: none), qs offset, int8)
FMT = {
    "Q4_0": (18, -1, -8.0, -1, 2, False),
    "Q4_1": (20, 2, 0.0, -1, 4, False),
    "Q5_0": (22, -1, -16.0, 2, 6, False),
    "Q5_1": (24, 2, 0.0, 4, 8, False),
    "Q8_0": (34, -1, 0.0, -1, 2, True),
}
FMT_ID = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4}
QTYPES = {QType.Q4_0: "Q4_0", QType.Q4_1: "Q4_1", QType.Q5_0: "Q5_0", QType.Q5_1: "Q5_1", QType.Q8_0: "Q8_0"}


def _block_vals(builder, fmt, bp):
    """Block at byte pointer bp -> (values 0..15, values 16..31) as <16 x i8>, d, m (float32 or None)."""
    nbytes, m_off, mmul, qh_off, qs_off, is_i8 = FMT[fmt]
    if m_off == 2:  # d, m adjacent: one 32-bit load, one vcvtph2ps for both
        hp = builder.bitcast(bp, I32.as_pointer())
        h2 = builder.bitcast(builder.load(hp, align=1), ir.VectorType(F16, 2))
        dm = builder.fpext(h2, ir.VectorType(F32, 2))
        d = builder.extract_element(dm, ir.Constant(I32, 0))
        m_pair = builder.extract_element(dm, ir.Constant(I32, 1))
    else:
        d = f16_at(builder, bp, 0)
        m_pair = None
    qp = builder.gep(bp, [i64(qs_off)])
    if is_i8:
        lo, hi = load_i8x32(builder, qp)
        return lo, hi, d, None
    lo, hi = nibbles(builder, qp)
    if qh_off >= 0:
        hp = builder.bitcast(builder.gep(bp, [i64(qh_off)]), I32.as_pointer())
        lo, hi = with_high_bits(builder, lo, hi, builder.load(hp, align=1))
    m = m_pair if m_off >= 0 else builder.fmul(d, ir.Constant(F32, mmul))
    return lo, hi, d, m


def q8_dots(builder, b_p, xq, xd, rb, nb) -> list:
    """Row rb/nb of Q8_0 blocks dotted with each token's int16 activations (xq, xd: lists of per-token
    pointers): float32 per token. Per block: two vpmovsxbw to 16 x i16 and, per token, two 256-bit
    vpmaddwd, one add and one 8-lane FMA; even / odd blocks go to two accumulators (the FMA latency
    is not the bound). (Zen 1 split a 256-bit op in two; later cores and the Xeons do it whole: 4-lane
    pieces were 1.5x the ops.) Used alike by the 1-token and the 4-token dots (bitwise the same per
    token)."""
    n = len(xq)
    pmadd8 = declare(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16])
    fma8 = declare(builder, "llvm.fma.v8f32", V8F, [V8F] * 3)
    v16i8p = ir.VectorType(ir.IntType(8), 16).as_pointer()

    def block(i, accs):
        bp = builder.gep(b_p, [builder.mul(builder.add(rb, i), i64(34))])
        d = f16_at(builder, bp, 0)
        ws = [builder.sext(builder.load(builder.bitcast(builder.gep(bp, [i64(2 + 16 * k)]), v16i8p), align=1), V16I16)
              for k in range(2)]
        out = []
        for t in range(n):
            xv = builder.bitcast(builder.gep(xq[t], [builder.mul(i, i64(32))]), V16I16.as_pointer())
            ps = [builder.call(pmadd8, [w, builder.load(builder.gep(xv, [i64(k)]), align=2)]) for k, w in enumerate(ws)]
            sc = splat(builder, builder.fmul(d, builder.load(builder.gep(xd[t], [i]))), 8)
            out.append(builder.call(fma8, [builder.sitofp(builder.add(ps[0], ps[1]), V8F), sc, accs[t]]))
        return out

    zero8 = ir.Constant(V8F, [0.0] * 8)
    n_pairs = builder.ashr(nb, i64(1))

    def pair(k, *accs):
        i = builder.shl(k, i64(1))
        return block(i, accs[:n]) + block(builder.add(i, i64(1)), accs[n:])

    accs = counted_loop(builder, n_pairs, [zero8] * (2 * n), pair, "q8dot")
    n2 = builder.shl(n_pairs, i64(1))
    ev = counted_loop(builder, builder.sub(nb, n2), accs[:n], lambda k, *a: block(builder.add(n2, k), a), "q8dot.t")
    return [hsum8(builder, builder.fadd(ev[t], accs[n + t])) for t in range(n)]


def _gen_dot(fmt):
    """codegen: dot(row of GGUF blocks, int16 activations) -> float32; args (blk, xq, xd, xs, (rb, nb))."""
    nbytes, _, _, _, _, is_i8 = FMT[fmt]

    def codegen(context, builder, sig, args):
        ba, xqa, xda, xsa, offa = args
        sa = sig.args
        b_p = array_data(context, builder, sa[0], ba)
        xq_p = array_data(context, builder, sa[1], xqa)
        xd_p = array_data(context, builder, sa[2], xda)
        xs_p = array_data(context, builder, sa[3], xsa)
        rb = builder.extract_value(offa, 0)
        nb = builder.extract_value(offa, 1)
        if fmt == "Q8_0":
            return q8_dots(builder, b_p, [xq_p], [xd_p], rb, nb)[0]
        pmaddwd = declare(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16])
        fma = declare(builder, "llvm.fma.v8f32", V8F, [V8F, V8F, V8F])

        def block(i, acc, macc):
            bp = builder.gep(b_p, [builder.mul(builder.add(rb, i), i64(nbytes))])
            v0, v1, d, m = _block_vals(builder, fmt, bp)
            if FMT[fmt][1] < 0 and m is not None:  # m = mmul*d: sum d*xs here, times mmul after the loop
                m = d
            ext = builder.sext if is_i8 else builder.zext
            w0 = ext(v0, V16I16)
            w1 = ext(v1, V16I16)
            xp = builder.bitcast(builder.gep(xq_p, [builder.mul(i, i64(32))]), V16I16.as_pointer())
            p0 = builder.call(pmaddwd, [w0, builder.load(xp, align=2)])
            p1 = builder.call(pmaddwd, [w1, builder.load(builder.gep(xp, [i64(1)]), align=2)])
            dx = builder.load(builder.gep(xd_p, [i]))
            sc = splat(builder, builder.fmul(d, dx), 8)
            acc2 = builder.call(fma, [builder.sitofp(builder.add(p0, p1), V8F), sc, acc])
            if m is not None:
                return acc2, builder.fadd(macc, builder.fmul(m, builder.load(builder.gep(xs_p, [i]))))
            return acc2, macc

        acc, macc = counted_loop(builder, nb, [ir.Constant(V8F, [0.0] * 8), ir.Constant(F32, 0.0)], block, "bdot")
        if FMT[fmt][1] < 0 and not is_i8:
            macc = builder.fmul(macc, ir.Constant(F32, FMT[fmt][2]))
        return builder.fadd(hsum8(builder, acc), macc)

    return codegen


def _gen_deq(fmt):
    """codegen: blocks [rb, rb+nb) -> out[0 : 32*nb] float32; args (blk, out, (rb, nb))."""
    nbytes, _, _, _, _, is_i8 = FMT[fmt]

    def codegen(context, builder, sig, args):
        ba, oa, offa = args
        b_p = array_data(context, builder, sig.args[0], ba)
        o_p = array_data(context, builder, sig.args[1], oa)
        rb = builder.extract_value(offa, 0)
        nb = builder.extract_value(offa, 1)
        fma16 = declare(builder, "llvm.fma.v16f32", V16F, [V16F] * 3)

        def block(i):
            bp = builder.gep(b_p, [builder.mul(builder.add(rb, i), i64(nbytes))])
            v0, v1, d, m = _block_vals(builder, fmt, bp)
            cvt = builder.sitofp if is_i8 else builder.uitofp
            dv = splat(builder, d, 16)
            op = builder.gep(o_p, [builder.mul(i, i64(32))])
            op0 = builder.bitcast(op, V16F.as_pointer())
            op1 = builder.bitcast(builder.gep(op, [i64(16)]), V16F.as_pointer())
            if m is None:
                builder.store(builder.fmul(cvt(v0, V16F), dv), op0, align=4)
                builder.store(builder.fmul(cvt(v1, V16F), dv), op1, align=4)
            else:
                mv = splat(builder, m, 16)
                builder.store(builder.call(fma16, [cvt(v0, V16F), dv, mv]), op0, align=4)
                builder.store(builder.call(fma16, [cvt(v1, V16F), dv, mv]), op1, align=4)
            return ()

        counted_loop(builder, nb, [], block, "bdeq")
        return context.get_dummy_value()

    return codegen


def _make(fmt):
    @intrinsic
    def dot(typingctx, blk, xq, xd, xs, off):
        return types.float32(blk, xq, xd, xs, off), _gen_dot(fmt)

    @intrinsic
    def deq(typingctx, blk, out, off):
        return types.void(blk, out, off), _gen_deq(fmt)

    return dot, deq


dot_q4_0, deq_q4_0 = _make("Q4_0")
dot_q4_1, deq_q4_1 = _make("Q4_1")
dot_q5_0, deq_q5_0 = _make("Q5_0")
dot_q5_1, deq_q5_1 = _make("Q5_1")
dot_q8_0, deq_q8_0 = _make("Q8_0")


@njit(**INLINE)
def dot_blk(fmt, blk, xq, xd, xs, off):
    if fmt == 0:
        return dot_q4_0(blk, xq, xd, xs, off)
    if fmt == 1:
        return dot_q4_1(blk, xq, xd, xs, off)
    if fmt == 2:
        return dot_q5_0(blk, xq, xd, xs, off)
    if fmt == 3:
        return dot_q5_1(blk, xq, xd, xs, off)
    return dot_q8_0(blk, xq, xd, xs, off)


@njit(**INLINE)
def deq_blk(fmt, blk, out, off):
    if fmt == 0:
        deq_q4_0(blk, out, off)
    elif fmt == 1:
        deq_q4_1(blk, out, off)
    elif fmt == 2:
        deq_q5_0(blk, out, off)
    elif fmt == 3:
        deq_q5_1(blk, out, off)
    else:
        deq_q8_0(blk, out, off)
