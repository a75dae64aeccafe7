"""Host memory bandwidth as decode sees it, and how it shares with the PCIe copy engine.

Decode of weights in host memory reads every byte once per token: its ceiling is the host's read
bandwidth, and a split decode (CPU computes some layers while the copy engine streams the others)
needs the CPU's reads and the DMA's reads to add up. This prints GB/s of a parallel read at
several thread counts, of pinned host->device copies alone, and of both at once.

    python -m lstream.tools.host_bandwidth [--gib 4] [--threads 1,4,8,16]
"""
from __future__ import annotations

import argparse
import threading
import time

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def _read(a, n_chunks):  # a: (n, 64) uint64; one 8-byte load per element, summed per chunk
    out = np.zeros(n_chunks, np.uint64)
    rows = a.shape[0] // n_chunks
    for c in numba.prange(n_chunks):
        s = np.uint64(0)
        for i in range(c * rows, (c + 1) * rows):
            for j in range(a.shape[1]):
                s += a[i, j]
        out[c] = s
    return out


def read_gbps(a, threads: int, reps: int = 3) -> float:
    numba.set_num_threads(threads)
    _read(a[:1024], threads * 4)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        _read(a, threads * 16)
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def h2d_gbps(host, dev, reps: int = 5) -> float:
    import torch
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return reps * host.numel() / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--threads", default="1,2,4,8,12,16")
    a = ap.parse_args(argv)
    n = int(a.gib * (1 << 30)) // 512
    arr = np.ones((n, 64), np.uint64)
    for t in (int(x) for x in a.threads.split(",")):
        if t <= numba.config.NUMBA_NUM_THREADS:
            print(f"read {t:2d} threads: {read_gbps(arr, t):6.1f} GB/s", flush=True)
    try:
        import torch
        if not torch.cuda.is_available():
            return
    except ImportError:
        return
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty_like(host, device="cuda")
    print(f"h2d pinned alone: {h2d_gbps(host, dev):6.1f} GB/s", flush=True)
    t = numba.config.NUMBA_NUM_THREADS
    res = {}
    th = threading.Thread(target=lambda: res.setdefault("read", read_gbps(arr, t, reps=6)))
    th.start()
    time.sleep(0.2)
    res["h2d"] = h2d_gbps(host, dev, reps=20)
    th.join()
    print(f"together: h2d {res['h2d']:6.1f} GB/s + read ({t} threads) {res['read']:6.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
