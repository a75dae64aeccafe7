"""AVX2 inner loops of decode attention as LLVM IR (numba @intrinsic): the scores of 8 keys at a time
and the probability-weighted sum of value rows with the accumulator in registers.  Used by the
attention kernels (attention.py) when head_dim is a multiple of 8.  The K/V arrays are float32, or
uint16 holding float16 bits (the decode's half-precision cache: numba has no float16 arrays), widened
to float32 as they are loaded (vcvtph2ps)."""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .llvm_ir import F16, I16, I32, V8F, array_data, counted_loop, declare, hsum8, i64, splat

# Written by numba, the score loop q . k over 4 keys ends in 4 horizontal sums (~7 instructions each
# for 8-16 FMAs at head_dim 64) and the value loop keeps its accumulator in memory (a load and a store
# per 8 lanes and 4 keys).  Here: 8 keys x head_dim/8 FMAs into 8 accumulators, reduced together by 6
# vhaddps + 2 shuffles + 1 add into one vector of 8 scores; and acc += p[s] * v[s] over the keys with
# 64 lanes of the accumulator held in 8 ymm registers (9 instructions per key and 64 lanes).

_ZERO = ir.Constant(V8F, [0.0] * 8)


def _f32p(builder, p):
    return builder.bitcast(p, V8F.as_pointer())


def _load8(builder, p, half: bool):
    """8 consecutive elements at p as <8 x float>: float32, or float16 bits widened."""
    if not half:
        return builder.load(_f32p(builder, p), align=4)
    h = builder.load(builder.bitcast(p, ir.VectorType(I16, 8).as_pointer()), align=2)
    return builder.fpext(builder.bitcast(h, ir.VectorType(F16, 8)), V8F)


def _is_half(aty) -> bool:
    return aty.dtype == types.uint16


def _i64(context, builder, v, t):
    return context.cast(builder, v, t, types.int64)


@intrinsic
def scores8(typingctx, q, qo, kc, ko, ks, n8, hd8, scale, sc, so):
    """For i < n8, j < 8: sc[so + 8i + j] = scale * sum_d q[qo + d] * kc[ko + (8i + j) * ks + d], d < 8 hd8
    (flat element offsets into C-contiguous float32 arrays)."""
    sig = types.void(q, qo, kc, ko, ks, n8, hd8, scale, sc, so)

    def codegen(context, builder, sig, args):
        qa, qo_, ka, ko_, ks_, n8_, hd8_, sc_v, sa, so_ = args
        ta = sig.args
        qo_, ko_, ks_, n8_, hd8_, so_ = (_i64(context, builder, v, ta[k]) for v, k in
                                         ((qo_, 1), (ko_, 3), (ks_, 4), (n8_, 5), (hd8_, 6), (so_, 9)))
        scale_ = context.cast(builder, sc_v, ta[7], types.float32)
        q_p = builder.gep(array_data(context, builder, ta[0], qa), [qo_])
        k_p = builder.gep(array_data(context, builder, ta[2], ka), [ko_])
        s_p = builder.gep(array_data(context, builder, ta[8], sa), [so_])
        fma = declare(builder, "llvm.fma.v8f32", V8F, [V8F, V8F, V8F])
        hadd = declare(builder, "llvm.x86.avx.hadd.ps.256", V8F, [V8F, V8F])
        ks8 = builder.mul(ks_, i64(8))
        lo_ix = ir.Constant(ir.VectorType(I32, 8), [0, 1, 2, 3, 8, 9, 10, 11])
        hi_ix = ir.Constant(ir.VectorType(I32, 8), [4, 5, 6, 7, 12, 13, 14, 15])
        vscale = splat(builder, scale_, 8)
        half = _is_half(ta[2])

        def group(i):
            kb = builder.gep(k_p, [builder.mul(i, ks8)])
            rows = [builder.gep(kb, [builder.mul(ks_, i64(j))]) for j in range(8)]

            def chunk(c, *accs):
                off = builder.mul(c, i64(8))
                qv = builder.load(_f32p(builder, builder.gep(q_p, [off])), align=4)
                return [builder.call(fma, [qv, _load8(builder, builder.gep(rows[j], [off]), half), accs[j]])
                        for j in range(8)]

            a = counted_loop(builder, hd8_, [_ZERO] * 8, chunk, "sc.d")
            h01 = builder.call(hadd, [a[0], a[1]])
            h23 = builder.call(hadd, [a[2], a[3]])
            h45 = builder.call(hadd, [a[4], a[5]])
            h67 = builder.call(hadd, [a[6], a[7]])
            h0 = builder.call(hadd, [h01, h23])  # keys 0-3: sums of lanes 0-3 | of lanes 4-7
            h1 = builder.call(hadd, [h45, h67])  # keys 4-7
            r = builder.fadd(builder.shuffle_vector(h0, h1, lo_ix), builder.shuffle_vector(h0, h1, hi_ix))
            builder.store(builder.fmul(r, vscale), _f32p(builder, builder.gep(s_p, [builder.mul(i, i64(8))])),
                          align=4)
            return ()

        counted_loop(builder, n8_, [], group, "sc.k")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def add_values(typingctx, p, po, vc, vo, vs, n, hd, acc, ao):
    """acc[ao + d] += sum_{s < n} p[po + s] * vc[vo + s * vs + d] for d < hd (hd a multiple of 8): 64 lanes of
    acc at a time in registers over all n rows, then 8 at a time."""
    sig = types.void(p, po, vc, vo, vs, n, hd, acc, ao)

    def codegen(context, builder, sig, args):
        pa, po_, va, vo_, vs_, n_, hd_, aa, ao_ = args
        ta = sig.args
        po_, vo_, vs_, n_, hd_, ao_ = (_i64(context, builder, v, ta[k]) for v, k in
                                       ((po_, 1), (vo_, 3), (vs_, 4), (n_, 5), (hd_, 6), (ao_, 8)))
        p_p = builder.gep(array_data(context, builder, ta[0], pa), [po_])
        v_p = builder.gep(array_data(context, builder, ta[2], va), [vo_])
        a_p = builder.gep(array_data(context, builder, ta[7], aa), [ao_])
        fma = declare(builder, "llvm.fma.v8f32", V8F, [V8F, V8F, V8F])
        half = _is_half(ta[2])

        def piece(d0, width):
            """acc[d0 : d0 + 8*width] over all rows, width ymm accumulators."""
            ap = [_f32p(builder, builder.gep(a_p, [builder.add(d0, i64(8 * i))])) for i in range(width)]
            init = [builder.load(x, align=4) for x in ap]

            def row(s, *accs):
                pb = splat(builder, builder.load(builder.gep(p_p, [s])), 8)
                vr = builder.gep(v_p, [builder.add(builder.mul(s, vs_), d0)])
                return [builder.call(fma, [pb, _load8(builder, builder.gep(vr, [i64(8 * i)]), half), accs[i]])
                        for i in range(width)]

            out = counted_loop(builder, n_, init, row, "av.s")
            for x, v in zip(ap, out):
                builder.store(v, x, align=4)

        def wide(c):
            piece(builder.mul(c, i64(64)), 8)
            return ()

        n64 = builder.ashr(hd_, i64(6))
        counted_loop(builder, n64, [], wide, "av.c64")

        def narrow(c):
            piece(builder.add(builder.mul(n64, i64(64)), builder.mul(c, i64(8))), 1)
            return ()

        counted_loop(builder, builder.ashr(builder.and_(hd_, i64(63)), i64(3)), [], narrow, "av.c8")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def score1(typingctx, q, qo, kc, ko, hd8, scale, sc, so):
    """One key (scores8's tail): sc[so] = scale * sum_{d < 8 hd8} q[qo + d] * kc[ko + d]."""
    sig = types.void(q, qo, kc, ko, hd8, scale, sc, so)

    def codegen(context, builder, sig, args):
        qa, qo_, ka, ko_, hd8_, sc_v, sa, so_ = args
        ta = sig.args
        qo_, ko_, hd8_, so_ = (_i64(context, builder, v, ta[k]) for v, k in ((qo_, 1), (ko_, 3), (hd8_, 4), (so_, 7)))
        q_p = builder.gep(array_data(context, builder, ta[0], qa), [qo_])
        k_p = builder.gep(array_data(context, builder, ta[2], ka), [ko_])
        fma = declare(builder, "llvm.fma.v8f32", V8F, [V8F, V8F, V8F])
        half = _is_half(ta[2])

        def chunk(c, acc):
            off = builder.mul(c, i64(8))
            qv = builder.load(_f32p(builder, builder.gep(q_p, [off])), align=4)
            return [builder.call(fma, [qv, _load8(builder, builder.gep(k_p, [off]), half), acc])]

        acc, = counted_loop(builder, hd8_, [_ZERO], chunk, "s1.d")
        r = builder.fmul(hsum8(builder, acc), context.cast(builder, sc_v, ta[5], types.float32))
        builder.store(r, builder.gep(array_data(context, builder, ta[6], sa), [so_]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def put_half(typingctx, a, i, x):
    """a.flat[i] = the float16 bits of x rounded (vcvtps2ph), a: a half cache's uint16 array."""
    if not _is_half(a):
        return None
    sig = types.void(a, i, x)

    def codegen(context, builder, sig, args):
        aa, i_, x_ = args
        ta = sig.args
        p = builder.gep(array_data(context, builder, ta[0], aa), [_i64(context, builder, i_, ta[1])])
        f = context.cast(builder, x_, ta[2], types.float32)
        builder.store(builder.bitcast(builder.fptrunc(f, F16), I16), p)
        return context.get_dummy_value()

    return sig, codegen
