"""A long generation (4096 tokens by default) with tokens/s reported over time, to see that decode
does not slow down beyond what the growing attention explains. Too slow for CI; run by hand:

    python -m lstream.tools.long_generation [-m MODEL] [-n 4096] [--window 256] [-ngl 0] [-t THREADS]

Each line is one window of generated tokens: its position range, t/s in the window, and the RSS.
The last lines compare the last window with the first: decode costs O(weights) + O(position) per
token, so a ratio that drifts far beyond the attention share (printed) points at a leak or a stall.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-n", "--n-predict", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-p", "--prompt", default="Write a very long story about a lighthouse keeper.")
    a = ap.parse_args(argv)

    import lstream
    from lstream.core.timings import Timings
    from lstream.loaders.registry import resolve
    prompt_n = 64
    m = lstream.load(str(resolve(a.model)), n_ctx=a.n_predict + prompt_n + 8, n_gpu_layers=a.n_gpu_layers,
                     n_threads=a.threads)
    toks = m.tokenize(a.prompt)[:prompt_n]
    cfg = m.config
    print(f"long generation: {cfg.name or cfg.arch}, {a.n_predict} tokens after a {len(toks)}-token prompt, "
          f"window {a.window}, ngl {a.n_gpu_layers}", flush=True)
    timings = Timings()
    rates = []
    t_win, n = time.perf_counter(), 0
    for _tok in m.generate_tokens(toks, a.n_predict, timings=timings, stop_at_eos=False):
        n += 1
        if n % a.window == 0:
            now = time.perf_counter()
            rate = a.window / (now - t_win)
            rates.append(rate)
            print(f"  tokens {n - a.window:5d}-{n:5d}: {rate:7.2f} t/s   RSS {rss_mib():7.1f} MiB", flush=True)
            t_win = now
    print(timings.line())
    if len(rates) >= 2:
        # share of decode work that grows with position: attention reads 2 * n_kv * head_dim values per
        # layer per position, against the weights' n_params multiply-adds
        kv_per_pos = 2 * cfg.n_layer * cfg.n_head * cfg.head_dim
        params = m.loaded.n_params if m.loaded is not None else 0
        growth = kv_per_pos * (a.n_predict + len(toks)) / max(params, 1)
        ref = rates[1] if len(rates) >= 3 else rates[0]  # the first window includes JIT warm-up
        print(f"second window {ref:.2f} t/s, last {rates[-1]:.2f} t/s: ratio {rates[-1] / ref:.2f} "
              f"(attention at the end adds ~{growth * 100:.0f}% of the weights' work per token)")
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
