"""The numba thread pool (OpenMP) that runs every parallel kernel: its size, and the wait policy it
starts with (set before the first parallel kernel: by CPUBackend's constructor, or pack() without one)."""
from __future__ import annotations

import os

import numba

_spin_set = False


def spin_by_default() -> None:
    """numba's OpenMP workers must spin between the many small parallel calls of decode: with libgomp's
    default wait policy an idle worker sleeps and every prange launch costs 4-8 ms on this VM (measured),
    vs ~2 us when spinning. libgomp reads GOMP_SPINCOUNT when the pool starts, so this runs before;
    only when the user chose neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT."""
    global _spin_set
    if not _spin_set:
        _spin_set = True
        if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
            os.environ["GOMP_SPINCOUNT"] = "1000000"


def set_threads(n: int) -> None:
    """Threads of the next parallel kernels (at most numba's pool size); the first call starts the pool."""
    spin_by_default()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
