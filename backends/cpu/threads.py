"""The numba thread pool (OpenMP) that runs every parallel kernel: its size, and the wait policy it
must start with."""
from __future__ import annotations

import os

import numba

# numba's OpenMP workers must spin between the many small parallel calls of decode: with libgomp's
# default wait policy an idle worker sleeps and every prange launch costs 4-8 ms on this VM (measured),
# vs ~2 us when spinning.  Only a default: the user's environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000000")


def set_threads(n: int) -> None:
    """Threads of the next parallel kernels (at most numba's pool size)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
