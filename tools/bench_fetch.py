"""Routed experts from a pinned arena to a device slot: the share's fetch kernel (zero-copy reads over
PCIe, backends/cuda/expert_fetch.py) against the copy engine's 2-D copies (one per expert), GB/s of
expert bytes, CUDA-event timed, a different routing each round (the GPU's L2 holds 50 MB).

    python -m lstream.tools.bench_fetch [--gib 8] [--n 4] [--rounds 200]
"""
from __future__ import annotations

import click
import numpy as np


@click.command()
@click.option("--gib", type=float, default=8.0, help="pinned arena size")
@click.option("--n", "n", type=int, default=4, help="experts a round")
@click.option("--eb", type=int, default=884736, help="bytes an expert a tensor (Qwen3-30B-A3B Q4_0)")
@click.option("--rounds", type=int, default=200)
def main(gib, n, eb, rounds):
    import torch
    from ..backends.cuda import expert_fetch as ef
    from ..backends.cuda.runtime import CudaRuntime
    rt = CudaRuntime(torch.device("cuda"))
    arena = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, pin_memory=True)
    n_expert = 128
    pitch = n_expert * eb
    n_layers = arena.numel() // (3 * pitch)
    slot = torch.empty((3, n, eb), dtype=torch.uint8, device="cuda")
    rng = np.random.default_rng(0)
    plan = [(int(rng.integers(n_layers)) * 3 * pitch, rng.choice(n_expert, n, replace=False)) for _ in range(rounds)]
    ids = torch.tensor(np.stack([p[1] for p in plan]), dtype=torch.int64, device="cuda")
    moved = rounds * 3 * n * eb
    s = torch.cuda.current_stream()

    def timed(f):
        f(0)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(s)
        for i in range(rounds):
            f(i)
        b.record(s)
        b.synchronize()
        return a.elapsed_time(b) / 1e3

    def kernel(i):
        ef.fetch(arena, ids[i:i + 1], 0, n, slot, plan[i][0], pitch, eb)

    descs = [rt.rows_copy(slot[0, j], n * eb, arena, 0, pitch, eb, 3) for j in range(n)]

    def dma(i):
        base, es = plan[i]
        for j, e in enumerate(es.tolist()):
            rt.issue_copy(rt.retarget(descs[j], arena, base + e * eb, pitch), s)

    print(f"{n} experts x 3 tensors x {eb} bytes a round, {rounds} rounds, arena {gib:g} GiB pinned")
    for name, f in (("fetch kernel", kernel), ("2-D copies", dma), ("fetch kernel", kernel), ("2-D copies", dma)):
        t = timed(f)
        print(f"  {name:12s} {t / rounds * 1e6:7.1f} us a round, {moved / t / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
