"""numpy's own OpenBLAS sgemm, callable from inside numba's parallel loops: prefill matmul (matmul_blas)
and attention. Located at import; whether it is used is the backend's option (Options.blas_prefill)."""
from __future__ import annotations

import ctypes
import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .jit import INLINE
from .llvm_ir import F32, I32, I64, declare

# Calling numpy's matmul between numba kernels does not work on a small machine: numba's OpenMP workers
# and OpenBLAS's own threads both spin and collapse each other (tools/kernel_notes.md). So numba owns the
# threads and each of them calls the single-threaded sgemm of numpy's OpenBLAS (scipy_openblas64_,
# shipped in numpy's wheels) on its share; OpenBLAS's pool is set to one thread around the call.
#
# The library is located at import and reached through a named symbol (llvmlite add_symbol), so numba's
# on-disk cache holds no process-specific address. AVAILABLE is False if numpy carries no such OpenBLAS;
# whether the backend uses it is its option (Options.blas_prefill).

_SYM = "lstream_cblas_sgemm_ilp64"


def _openblas():
    """numpy's OpenBLAS (ILP64, scipy_openblas64_ naming) as a ctypes library, or None."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1] if len(line.split()) >= 6 else ""
                if "openblas" in os.path.basename(p).lower() and p not in paths:
                    paths.append(p)
    except OSError:
        pass
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
            sg = lib.scipy_cblas_sgemm64_
            gt = lib.scipy_openblas_get_num_threads64_
            st = lib.scipy_openblas_set_num_threads64_
        except (OSError, AttributeError):
            continue
        return lib, sg, gt, st
    return None


AVAILABLE = False
_get_threads = _set_threads = None
_lib = _openblas()
if _lib is not None:
    import llvmlite.binding as _llb

    _, _sg, _gt, _st = _lib
    _gt.restype = ctypes.c_int
    _gt.argtypes = []
    _st.restype = None
    _st.argtypes = [ctypes.c_int]
    _get_threads, _set_threads = _gt, _st
    _llb.add_symbol(_SYM, ctypes.cast(_sg, ctypes.c_void_p).value)
    AVAILABLE = True


def openblas_threads() -> int:
    """OpenBLAS's own thread count (set_num_threads of numpy's library)."""
    return _get_threads()


class one_blas_thread:
    """OpenBLAS's own pool at 1 thread for the duration (restored after)."""

    def __enter__(self):
        self.n = _get_threads()
        if self.n != 1:
            _set_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            _set_threads(self.n)


_F32P = F32.as_pointer()


@intrinsic
def sgemm(typingctx, transb, m, n, k, alpha, a, lda, b, ldb, c, ldc):
    """C[m, n] (row-major, ldc) = alpha * A[m, k] (lda) @ op(B), op(B) = B[n, k]^T (transb=True) or
    B[k, n] (transb=False); pointers as integers."""
    sig = types.void(transb, m, n, k, alpha, a, lda, b, ldb, c, ldc)

    def codegen(context, builder, sig, args):
        tb = builder.select(context.cast(builder, args[0], sig.args[0], types.boolean),
                            ir.Constant(I32, 112), ir.Constant(I32, 111))
        al = context.cast(builder, args[4], sig.args[4], types.float32)
        vals = [context.cast(builder, v, t, types.int64) for v, t in zip(args, sig.args)]
        _, m_, n_, k_, _, a_, lda_, b_, ldb_, c_, ldc_ = vals
        fn = declare(builder, _SYM, ir.VoidType(), [I32, I32, I32, I64, I64, I64, F32, _F32P, I64,
                                                    _F32P, I64, F32, _F32P, I64])
        builder.call(fn, [ir.Constant(I32, 101), ir.Constant(I32, 111), tb, m_, n_, k_, al,
                          builder.inttoptr(a_, _F32P), lda_, builder.inttoptr(b_, _F32P), ldb_,
                          ir.Constant(F32, 0.0), builder.inttoptr(c_, _F32P), ldc_])
        return context.get_dummy_value()

    return sig, codegen


@njit(**INLINE)
def sgemm_nt(m, n, k, a, lda, b, ldb, c, ldc):
    """C[m, n] = A[m, k] @ B[n, k]^T."""
    sgemm(True, m, n, k, np.float32(1.0), a, lda, b, ldb, c, ldc)
