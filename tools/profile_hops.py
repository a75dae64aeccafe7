"""Where a host-expert decode step goes (--cpu-moe / -ncmoe, CUDA graphs on): wall time per phase of
each layer's hop, by timers around the calls (no cProfile: its overhead is the size of the hop).

    python -m lstream.tools.profile_hops MODEL.gguf --ncmoe 8 -n 32

Phases: `replay` (a segment's graph launch), `read_back` (the device values copied down, waiting
for the segment), `route`, `experts` (the grouped expert kernel), `send_up`, `copy_in`, `rest` (the
Python around them). Then the expert kernel alone on the same inputs, back to back, and after a
sleep as long as a segment: what the engine's context adds to it.
"""
from __future__ import annotations

import time
from collections import defaultdict

import click
import numpy as np


def _timed(obj, attr: str, acc: dict, key: str):
    f = getattr(obj, attr)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            acc[key] += time.perf_counter() - t0
            acc[key + "#"] += 1
    setattr(obj, attr, wrapper)
    return f


@click.command()
@click.argument("model")
@click.option("--ncmoe", type=int, default=99)
@click.option("-n", "n", type=int, default=32)
@click.option("-t", "threads", type=int, default=None)
def main(model, ncmoe, n, threads):
    from ..api import Model
    from ..backends.cpu import moe as cmoe
    from ..loaders.model_file import load_model
    m = Model(load_model(model), n_gpu_layers=99, n_ctx=512, load_tokenizer=False, n_cpu_moe=ncmoe,
              n_threads=threads)
    m.eval([1, 2, 3, 4])
    for t in range(4):
        m.eval([5 + t])
    m.synchronize()
    rep = m.runner.replay
    be = rep.be
    acc: dict = defaultdict(float)
    K = cmoe.K
    saved = [(be, "replay", _timed(be, "replay", acc, "replay")),
             (be, "read_back", _timed(be, "read_back", acc, "read_back")),
             (be, "send_up", _timed(be, "send_up", acc, "send_up")),
             (be, "copy_into", _timed(be, "copy_into", acc, "copy_in")),
             (K, "route", _timed(K, "route", acc, "route")),
             (K, "pairs_ffn", _timed(K, "pairs_ffn", acc, "experts"))]
    last = {}
    f_pairs = saved[-1][2]

    def keep(*a):  # the last call's arguments, for the kernel alone below
        last["a"] = a
        return f_pairs(*a)
    K.pairs_ffn = keep
    _timed(K, "pairs_ffn", acc, "experts")
    t0 = time.perf_counter()
    for t in range(n):
        m.eval([10 + t])
    m.synchronize()
    wall = (time.perf_counter() - t0) / n
    for obj, attr, f in saved:
        setattr(obj, attr, f)
    hops = acc["read_back#"] / n
    print(f"{wall * 1e3:.2f} ms/token ({1 / wall:.1f} t/s), {hops:.0f} hops a token, "
          f"{m.runner.replay.host_moe_runs} host MoE runs; per hop (us):")
    named = 0.0
    for k in ("replay", "read_back", "route", "experts", "send_up", "copy_in"):
        per = acc[k] / max(acc[k + "#"], 1) * 1e6
        named += acc[k]
        print(f"  {k:10s} {per:8.1f} us x {acc[k + '#'] / n:5.1f}/token = {acc[k] / n * 1e3:7.3f} ms/token")
    print(f"  {'rest':10s} {(wall * n - named) / n * 1e3:7.3f} ms/token (Python, checks, the head)")
    a = last.get("a")
    if a is None:
        return
    for pause in (0.0, 50e-6, 200e-6):
        ts = []
        for _ in range(50):
            if pause:
                t1 = time.perf_counter()
                while time.perf_counter() - t1 < pause:  # busy, as the main thread waiting on the GPU
                    pass
            t1 = time.perf_counter()
            f_pairs(*a)
            ts.append(time.perf_counter() - t1)
        print(f"expert kernel alone after {pause * 1e6:.0f} us idle: median {np.median(ts) * 1e6:.0f} us, "
              f"min {min(ts) * 1e6:.0f} us")
    m.close()


if __name__ == "__main__":
    main()
