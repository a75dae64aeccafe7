"""Vectorized float32 exp (LLVM IR, AVX2 + FMA) for softmax and silu/gelu; runs inside the attention
and activation kernels."""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .jit import SER as _SER
from .llvm_ir import V8F, V8I32, array_data, counted_loop, declare, i64

# numba has no SVML here, so np.exp in a loop is a scalar libm call per element (~5-10 ns): the
# softmax of prefill attention and silu/gelu of the FFN were bound by it.  vexp(a, start, n) computes
# a[start:start+n] = exp(a[start:start+n]) in place, 8 lanes at a time (AVX2 + FMA):
#     x clamped to [-80, 80] (result and 1/result stay normal floats: denormals cost a microcode assist
#     each, measured 9x slower on gelu) and exp(x) = 0 below -64 (softmax: see vexp8), k = rint(x*log2(e)),
#     f = x - k*ln2 (Cody-Waite, two constants), exp(f) by its Taylor polynomial of degree 7
#     (|f| <= ln2/2: truncation error < 1e-8 relative), times 2^k built in the exponent bits.
# Relative error ~1-2 ulp vs libm; NaN stays NaN.  The tail (n % 8) is done in vexp, scalar.


def _c(v):
    return ir.Constant(V8F, [float(np.float32(v))] * 8)


def vexp8(builder, x):
    """<8 x float> -> exp(x), IR."""
    vmax = declare(builder, "llvm.maxnum.v8f32", V8F, [V8F, V8F])
    vmin = declare(builder, "llvm.minnum.v8f32", V8F, [V8F, V8F])
    rint = declare(builder, "llvm.rint.v8f32", V8F, [V8F])
    fma = declare(builder, "llvm.fma.v8f32", V8F, [V8F, V8F, V8F])
    x0 = x
    x = builder.call(vmin, [builder.call(vmax, [x, _c(-80.0)]), _c(80.0)])
    k = builder.call(rint, [builder.fmul(x, _c(1.4426950408889634))])
    f = builder.call(fma, [k, _c(-0.693145751953125), x])  # ln2 hi (exact in 16 bits)
    f = builder.call(fma, [k, _c(-1.428606765330187e-06), f])  # ln2 lo
    p = _c(1.0 / 5040)
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = builder.call(fma, [p, f, _c(c)])
    ki = builder.fptosi(k, V8I32)
    bits = builder.shl(builder.add(ki, ir.Constant(V8I32, [127] * 8)), ir.Constant(V8I32, [23] * 8))
    r = builder.fmul(p, builder.bitcast(bits, V8F))
    # below -64 the result is exactly 0: a softmax over a long context would otherwise give every
    # far key a tiny probability whose products with V are denormals (30x slower decode at 3k tokens)
    r = builder.select(builder.fcmp_ordered("<", x0, _c(-64.0)), _c(0.0), r)
    # NaN stays NaN (maxnum/minnum above would have turned it into exp(-80)): a NaN score or gate must
    # reach the engine's non-finite check, not vanish into a tiny weight
    return builder.select(builder.fcmp_unordered("uno", x0, x0), x0, r)


@intrinsic
def _vexp_body(typingctx, a, start, n):
    """a[start : start + n//8*8] = exp(...) in place (a: 1-D float32 C-contiguous)."""
    sig = types.void(a, start, n)

    def codegen(context, builder, sig, args):
        aa, st, nn = args
        st = context.cast(builder, st, sig.args[1], types.int64)
        nn = context.cast(builder, nn, sig.args[2], types.int64)
        base = builder.gep(array_data(context, builder, sig.args[0], aa), [st])

        def block(i):
            p = builder.bitcast(builder.gep(base, [builder.mul(i, i64(8))]), V8F.as_pointer())
            builder.store(vexp8(builder, builder.load(p, align=4)), p, align=4)
            return ()

        counted_loop(builder, builder.ashr(nn, i64(3)), [], block, "vexp")
        return context.get_dummy_value()

    return sig, codegen




@njit(**_SER)
def vexp(a, start, n):
    """a[start:start+n] = exp(a[start:start+n]) in place; a 1-D float32 C-contiguous."""
    _vexp_body(a, start, n)
    for i in range(start + (n // 8) * 8, start + n):
        x = min(max(a[i], np.float32(-80.0)), np.float32(80.0))  # NaN stays NaN (max/min keep it here)
        a[i] = np.float32(0.0) if x < np.float32(-64.0) else np.exp(x)


GELU_K0 = np.float32(math.sqrt(2.0 / math.pi))
GELU_K1 = np.float32(0.044715)
