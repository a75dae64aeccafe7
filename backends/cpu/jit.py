"""The numba compile options every CPU kernel uses: one place for the error model and the fast-math
flags, so that no kernel raises on NaN, inf or huge inputs and a non-finite value reaches the engine's
check (core) instead of being optimized away."""
from __future__ import annotations

# error_model="numpy": a float division by zero gives inf/nan (numba's default "python" model tests
# every divisor and raises ZeroDivisionError from inside the kernel: e.g. a softmax whose scores are
# all -inf).  Integer division by zero gives 0 instead of raising.
#
# Fast-math without nnan/ninf: reassociation (vectorized sums), contraction (FMA), reciprocals,
# approximate functions and signed zeros stay allowed; "no NaN / no inf" does not, since with it LLVM
# may assume the inputs are finite and fold or drop the very values the engine's NaN/inf check looks
# for (x * 0 -> 0, x != x -> false, min/max choosing the other operand).
FASTMATH = {"nsz": True, "arcp": True, "contract": True, "afn": True, "reassoc": True}

SER = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)
PAR = dict(SER, parallel=True)
INLINE = dict(SER, inline="always")
# bit-exact kernels (dequantization against gguf-py): no fast-math at all (no FMA contraction)
EXACT = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)
EXACT_PAR = dict(EXACT, parallel=True)
