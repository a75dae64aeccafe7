"""LLVM IR building blocks shared by the hand-written @intrinsic kernels (simd, blocks, matmul_blas,
vmath): vector types, splat / horizontal sum, array pointers, nibble unpacking, a counted loop.
Used when numba compiles those kernels; HAVE_AVX2 says whether this host can run them at all."""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

try:
    import llvmlite.binding as _llb

    _feat = _llb.get_host_cpu_features()
    HAVE_AVX2 = bool(_feat.get("avx2", False))
    HAVE_F16C = bool(_feat.get("f16c", False))  # vcvtph2ps / vcvtps2ph: float16 <-> float32
    # vpdpbusd on 256-bit vectors (AVX-VNNI, or AVX512-VNNI with VL): u8 x s8 in groups of 4 into int32
    HAVE_VNNI = HAVE_AVX2 and bool(_feat.get("avxvnni", False) or (_feat.get("avx512vnni", False)
                                                                     and _feat.get("avx512vl", False)))
except Exception:  # pragma: no cover
    HAVE_AVX2 = HAVE_VNNI = HAVE_F16C = False

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F16 = ir.HalfType()
F32 = ir.FloatType()
V16I8 = ir.VectorType(I8, 16)
V32I8 = ir.VectorType(I8, 32)
V16I16 = ir.VectorType(I16, 16)
V8I32 = ir.VectorType(I32, 8)
V8F = ir.VectorType(F32, 8)
V4I32 = ir.VectorType(I32, 4)
V4F = ir.VectorType(F32, 4)
V8I16 = ir.VectorType(I16, 8)
V16F = ir.VectorType(F32, 16)

FIRST16 = ir.Constant(ir.VectorType(I32, 16), list(range(16)))
LAST16 = ir.Constant(ir.VectorType(I32, 16), list(range(16, 32)))


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def declare(builder, name: str, ret, argtys):
    """The function `name` (an LLVM intrinsic such as llvm.fma.v8f32), declared once per module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


def prefetch(builder, p) -> None:
    """A read prefetch of the cache line at byte pointer p into all cache levels (never faults: p may
    run past the array's end)."""
    opaque = getattr(ir.PointerType(I8), "is_opaque", False)  # llvmlite >= 0.44 on LLVM 15+: ptr
    f = declare(builder, "llvm.prefetch.p0" if opaque else "llvm.prefetch.p0i8", ir.VoidType(),
                [I8.as_pointer(), I32, I32, I32])
    builder.call(f, [builder.bitcast(p, I8.as_pointer()), ir.Constant(I32, 0), ir.Constant(I32, 3),
                     ir.Constant(I32, 1)])


def array_data(context, builder, aty, aval):
    """Pointer to the first element of a numba array argument."""
    return context.make_array(aty)(context, builder, aval).data


def splat(builder, val, n: int):
    """<n x val.type>, every lane val."""
    vty = ir.VectorType(val.type, n)
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, val, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(I32, n), [0] * n))


def hsum8(builder, v):
    """Sum of the 8 lanes of a <8 x float>: (a0+a4, a1+a5, a2+a6, a3+a7), then pairwise."""
    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 4), [0, 1, 2, 3]))
    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 4), [4, 5, 6, 7]))
    s = builder.fadd(lo, hi)
    a = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(I32, 2), [0, 1]))
    b = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(I32, 2), [2, 3]))
    s2 = builder.fadd(a, b)
    return builder.fadd(builder.extract_element(s2, ir.Constant(I32, 0)),
                        builder.extract_element(s2, ir.Constant(I32, 1)))


def hsum4(builder, v):
    """Sum of the 4 lanes of a <4 x float>: (a0+a2, a1+a3), then the pair."""
    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 2), [0, 1]))
    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 2), [2, 3]))
    s = builder.fadd(lo, hi)
    return builder.fadd(builder.extract_element(s, ir.Constant(I32, 0)),
                        builder.extract_element(s, ir.Constant(I32, 1)))


def f16_at(builder, p, off: int):
    """The fp16 at byte pointer p + off, as float32 (vcvtph2ps)."""
    hp = builder.bitcast(builder.gep(p, [i64(off)]), I16.as_pointer())
    return builder.fpext(builder.bitcast(builder.load(hp, align=1), F16), F32)


def halves(builder, v):
    """<32 x i8> -> its values 0..15 and 16..31 as two <16 x i8>."""
    return builder.shuffle_vector(v, v, FIRST16), builder.shuffle_vector(v, v, LAST16)


def load_i8x32(builder, p):
    """32 int8 at byte pointer p -> values 0..15, 16..31 as two <16 x i8>."""
    return halves(builder, builder.load(builder.bitcast(p, V32I8.as_pointer()), align=1))


def nibbles(builder, p):
    """16 bytes at p -> (low nibbles, high nibbles) as <16 x i8>: values 0..15 and 16..31 of a
    32-value block (byte j holds value j low and value j+16 high, GGUF's order)."""
    qv = builder.load(builder.bitcast(p, V16I8.as_pointer()), align=1)
    return builder.and_(qv, ir.Constant(V16I8, [15] * 16)), builder.lshr(qv, ir.Constant(V16I8, [4] * 16))


def with_high_bits(builder, lo, hi, word):
    """5-bit values: bit j of the i32 `word` adds 16 to value j (lo: values 0..15, hi: 16..31)."""
    hv = builder.bitcast(word, ir.VectorType(I1, 32))
    h8 = builder.shl(builder.zext(hv, V32I8), ir.Constant(V32I8, [4] * 32))
    h0, h1 = halves(builder, h8)
    return builder.or_(lo, h0), builder.or_(hi, h1)


def byte_nibbles(builder, p):
    """16 bytes at p in nibw word order -> (values 0,16,1,17,..,7,23), (8,24,9,25,..,15,31) as two
    <16 x i8>: the block order of int8 activations (matmul_int.quant_row8)."""
    qv = builder.load(builder.bitcast(p, V16I8.as_pointer()), align=1)
    c15 = ir.Constant(V16I8, [15] * 16)
    hi = builder.bitcast(builder.lshr(builder.bitcast(qv, V8I16), ir.Constant(V8I16, [4] * 8)), V16I8)
    return builder.and_(qv, c15), builder.and_(hi, c15)


def dot_bytes(builder, ws, xp):
    """The block's sum of w * x (ws: byte_nibbles' two <16 x u8>, xp: i8 pointer to the block's 32
    int8 activations) as 4 float lanes: two vpmaddubsw (pair sums <= 2*15*127, no saturation), one
    vpaddw, one vpmaddwd by ones to int32 (exact in float: |.| < 2^24)."""
    mub = declare(builder, "llvm.x86.ssse3.pmadd.ub.sw.128", V8I16, [V16I8, V16I8])
    pmadd4 = declare(builder, "llvm.x86.sse2.pmadd.wd", V4I32, [V8I16, V8I16])
    xv = builder.bitcast(xp, V16I8.as_pointer())
    p = builder.add(builder.call(mub, [ws[0], builder.load(xv, align=1)]),
                    builder.call(mub, [ws[1], builder.load(builder.gep(xv, [i64(1)]), align=1)]))
    return builder.sitofp(builder.call(pmadd4, [p, ir.Constant(V8I16, [1] * 8)]), V4F)


def counted_loop(builder, n, inits, body, name: str = "loop") -> list:
    """for i in range(n) (n: i64) carrying values: body(i, *values) emits one iteration and returns
    the next values. Returns the values after the loop (the inits when n <= 0)."""
    entry = builder.basic_block
    loop = builder.append_basic_block(name + ".loop")
    done = builder.append_basic_block(name + ".done")
    builder.cbranch(builder.icmp_signed(">", n, i64(0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(I64)
    carried = [builder.phi(v.type) for v in inits]
    nxt = list(body(i, *carried))
    latch = builder.basic_block
    i2 = builder.add(i, i64(1))
    builder.cbranch(builder.icmp_signed("<", i2, n), loop, done)
    i.add_incoming(i64(0), entry)
    i.add_incoming(i2, latch)
    for phi, v0, v1 in zip(carried, inits, nxt):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v1, latch)
    builder.position_at_end(done)
    out = []
    for v0, v1 in zip(inits, nxt):
        phi = builder.phi(v0.type)
        phi.add_incoming(v0, entry)
        phi.add_incoming(v1, latch)
        out.append(phi)
    return out
