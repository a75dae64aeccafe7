"""Benchmark the CPU decode attention (one token over a deep cache) on one layer's shape.

    python -m lstream.tools.bench_cpu_attention [--depths 512,4096] [--threads 1,4,16]
                                                [--heads 32 --kv 8 --hd 128] [--reps 20]

Per depth and thread count: the median time of backends/cpu/attention.attention_decode (the K/V
write and the split-K attention, as the compiled decode program calls it) and the K/V bytes read
per second (the float32 cache, 2 * depth * kv * hd * 4 bytes).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="512,4096")
    ap.add_argument("--threads", default="")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv", type=int, default=8)
    ap.add_argument("--hd", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    from lstream.backends.cpu import attention as att
    from lstream.backends.cpu.threads import set_threads
    import numba
    rng = np.random.default_rng(0)
    threads = [int(t) for t in a.threads.split(",") if t] or [numba.config.NUMBA_NUM_THREADS]
    for depth in (int(d) for d in a.depths.split(",")):
        kc = rng.standard_normal((depth + 8, a.kv, a.hd), dtype=np.float32)
        vc = rng.standard_normal((depth + 8, a.kv, a.hd), dtype=np.float32)
        q = rng.standard_normal((1, a.heads * a.hd), dtype=np.float32)
        kn = rng.standard_normal((1, a.kv * a.hd), dtype=np.float32)
        out = np.empty_like(q)
        for nt in threads:
            set_threads(nt)
            call = lambda: att.attention_decode(q, kn, kn, kc, vc, depth, a.heads, a.kv, a.hd,  # noqa: E731
                                                np.float32(a.hd ** -0.5), 0, out)
            call()
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t0)
            dt = statistics.median(ts)
            print(f"depth {depth:6d} threads {nt:3d}: {dt * 1e3:8.3f} ms  "
                  f"{2 * depth * a.kv * a.hd * 4 / dt / 1e9:6.1f} GB/s of K/V", flush=True)


if __name__ == "__main__":
    main()
