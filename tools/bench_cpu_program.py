"""Decode op by op vs compiled CPU programs (backends/cpu/program.py), alternating in one process.

    python -m lstream.tools.bench_cpu_program [MODEL] [-n 128] [--rounds 4] [-t THREADS]

Prints ms per token for each round of each mode and the largest logits difference between the
two modes over the first 16 steps (both decode the same tokens after the same prompt)."""
from __future__ import annotations

import argparse
import time

import numpy as np


def _decode(model, n: int, programs: bool):
    model.cpu.programs = programs
    model.executor._compiled.clear()
    model.reset()
    model.eval(list(range(1, 20)))
    outs = []
    t0 = time.perf_counter()
    for i in range(n):
        outs.append(model.eval([5 + i % 100]))
    return (time.perf_counter() - t0) / n, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("-n", type=int, default=128, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args()
    import lstream
    m = lstream.load(a.model, n_threads=a.threads, load_tokenizer=False)
    _, ref = _decode(m, 16, False)  # also compiles both paths before timing
    _, got = _decode(m, 16, True)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(ref, got))
    print(f"{a.model}: max |logits difference| over 16 steps {diff:.3g} (logits up to {np.abs(ref[-1]).max():.3g})")
    for r in range(a.rounds):
        for on in (False, True):
            dt, _ = _decode(m, a.n, on)
            print(f"round {r + 1} {'programs' if on else 'op by op'}: {dt * 1e3:.2f} ms/token ({1 / dt:.1f} t/s)")
    m.close()


if __name__ == "__main__":
    main()
