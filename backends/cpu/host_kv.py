"""A host layer's K/V cache: float32 rows every path writes and prefill reads, and a float16 mirror
that CPU decode attention reads from HALF_FROM cached tokens on (half the bytes of a deep cache,
llama.cpp's default cache type; decode at depth is bound by reading it).  A prompt's rows (written
by a prefill on either backend) are converted at its end over the threads (catch_up), decode's own
rows as it writes them, so no other writer changes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .llvm_ir import HAVE_AVX2, HAVE_F16C

HALF_DECODE = HAVE_AVX2 and HAVE_F16C  # the kernels convert with vcvtph2ps / vcvtps2ph
# Decode reads the mirror from this many cached tokens: below, the cache is a small part of a step's
# bytes and decode reads float32, the numbers the prefill and the paged server compute (exactly)
HALF_FROM = 1024


@dataclass
class HostKV:
    k: np.ndarray  # (n_ctx, n_kv_head, head_dim) float32
    v: np.ndarray  # (n_ctx, n_kv_head, head_dim) float32
    kh: np.ndarray | None = None  # float16 mirrors of k / v (uint16 bits: numba has no float16 arrays)
    vh: np.ndarray | None = None
    # rows [0, n_half[0]) of the mirrors equal k / v; -1: no mirror (a value beyond float16's range, a
    # paged server cache).  An array so that the compiled decode programs update it in place.
    n_half: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    allow_half: bool = True  # (Options.host_kv_half)

    def half(self, n_past: int) -> bool:
        """Decode at n_past reads the mirrors (made here the first time)."""
        if not (HALF_DECODE and self.allow_half) or n_past < HALF_FROM or self.n_half[0] < 0:
            return False
        if self.k.shape[2] % 8 or not (self.k.flags.c_contiguous and self.v.flags.c_contiguous):
            return False  # (the kernels read head_dim in 8-lane steps over C-contiguous rows)
        if self.kh is None:
            self.kh = np.empty(self.k.shape, np.uint16)
            self.vh = np.empty(self.v.shape, np.uint16)
        return True

    def catch_up(self, n_past: int) -> None:
        """At a prompt's end: the rows it wrote into the mirrors now, over the threads, so the first
        decode step does not convert a whole prompt's rows on one thread (as llama.cpp's prefill writes
        its float16 cache)."""
        if not self.half(n_past) or self.n_half[0] >= n_past:
            return
        from .attention import to_half_rows
        r0 = int(self.n_half[0])
        ok = to_half_rows(self.k, self.kh, r0, n_past) and to_half_rows(self.v, self.vh, r0, n_past)
        self.n_half[0] = n_past if ok else -1

    def rewritten_from(self, n: int) -> None:
        """Rows from n on will be written again (the sequence went back to n): their mirror is stale."""
        if self.n_half[0] > n:
            self.n_half[0] = n

    def no_half(self) -> None:
        """Never use the mirrors (a paged cache: its rows are slots, written by the paged kernels)."""
        self.n_half[0] = -1
        self.kh = self.vh = None
