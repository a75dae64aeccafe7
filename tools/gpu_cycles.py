"""50 load/generate/close cycles on the GPU: VRAM, pinned host memory and RSS before and after.

    python -m lstream.tools.gpu_cycles MODEL.gguf [-n 50] [-ngl 4]

Each cycle streams the non-resident layers (Always policy, 64-token prompt), then decodes 4 tokens.
"""
from __future__ import annotations

import argparse
import gc
import os


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    import numpy as np
    import torch

    import lstream
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("-ngl", type=int, default=4)
    a = ap.parse_args()

    def snapshot():
        gc.collect()
        torch.cuda.synchronize()
        host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
        return (torch.cuda.memory_allocated(), torch.cuda.memory_reserved(),
                host.get("allocated_bytes.current", host.get("allocations.current", -1)), rss())

    prompt = np.random.default_rng(0).integers(0, 1000, 64)
    rows = []
    for i in range(a.n):
        m = lstream.load(a.model, n_gpu_layers=a.ngl, policy=lstream.Always(), load_tokenizer=False)
        m.eval(prompt)
        list(m.generate_tokens([1, 2], n_predict=4, stop_at_eos=False))
        m.close()
        del m
        if i in (1, a.n - 1):
            rows.append((i + 1, *snapshot()))
    mib = 1 << 20
    for n, alloc, reserved, pinned, r in rows:
        print(f"after cycle {n:3d}: VRAM allocated {alloc / mib:8.1f} MiB, reserved {reserved / mib:8.1f} MiB, "
              f"pinned host {pinned / mib if pinned >= 0 else float('nan'):8.1f} MiB, RSS {r / mib:8.1f} MiB")
    (n0, a0, r0, p0, s0), (n1, a1, r1, p1, s1) = rows
    print(f"moved over cycles {n0}..{n1}: VRAM allocated {(a1 - a0) / mib:+.1f} MiB, reserved {(r1 - r0) / mib:+.1f} MiB, "
          f"pinned {(p1 - p0) / mib:+.1f} MiB, RSS {(s1 - s0) / mib:+.1f} MiB")


if __name__ == "__main__":
    main()
