"""Where a prefill's time goes: wall time of a P-token prompt at -ub U and -ngl N, the GPU kernel
time per kernel name (torch.profiler) and the host's hottest functions (cProfile).

    python -m lstream.tools.profile_prefill MODEL.gguf -ngl 33 -ub 512 -p 2048 [--top 25]
"""
from __future__ import annotations

import cProfile
import pstats
import time

import click
import numpy as np


@click.command()
@click.argument("model")
@click.option("-ngl", "ngl", type=int, default=99)
@click.option("-ub", "ub", type=int, default=512)
@click.option("-p", "n_prompt", type=int, default=2048)
@click.option("--top", type=int, default=25)
def main(model, ngl, ub, n_prompt, top):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..api import Model
    from ..loaders.model_file import load_model
    m = Model(load_model(model), n_gpu_layers=ngl, n_ctx=n_prompt + 64, n_ubatch=ub, load_tokenizer=False)
    toks = list(np.random.default_rng(0).integers(100, 1000, n_prompt))

    def once() -> float:
        m.reset()
        m.synchronize()
        t0 = time.perf_counter()
        m.eval(toks)
        m.synchronize()
        return time.perf_counter() - t0
    warm = [once() for _ in range(2)]  # first use: compiles, matmul choices
    runs = [once() for _ in range(3)]
    print(f"warm-up {['%.1f ms' % (w * 1e3) for w in warm]}; runs {['%.1f ms' % (r * 1e3) for r in runs]}: "
          f"{n_prompt / min(runs):.0f} t/s best; policy {m.policy.describe()}")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        once()
    ev = [e for e in p.key_averages() if e.self_device_time_total > 0]
    ev.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in ev)
    print(f"GPU kernel time: {total / 1e3:.1f} ms in {sum(e.count for e in ev)} kernels (wall {min(runs) * 1e3:.1f} ms)")
    for e in ev[:top]:
        print(f"  {e.self_device_time_total / 1e3:8.2f} ms  {e.count:6d}x  {e.key[:100]}")
    prof = cProfile.Profile()
    m.reset()
    prof.enable()
    m.eval(toks)
    m.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    del torch
    m.close()


if __name__ == "__main__":
    main()
