"""50 load/generate/close cycles on the GPU: VRAM, pinned host memory and RSS before and after.

    python -m lstream.tools.gpu_cycles MODEL.gguf [-n 50] [-ngl 4]

Each cycle streams the non-resident layers (Always policy, 64-token prompt), then decodes 4 tokens.
--strip-vocab first rewrites the model without its tokenizer arrays, whose parse dominates a load.
"""
from __future__ import annotations

import argparse
import gc
import os


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def strip_vocab(src, dst):
    """The model's tensors and hyper-parameters, without the tokenizer arrays."""
    import gguf
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for k, f in r.fields.items():
        if k.startswith(("GGUF.", "tokenizer.")) or k == "general.architecture" or f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        w.add_key_value(k, f.contents(), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def main() -> None:
    import numpy as np
    import torch

    import lstream
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("-ngl", type=int, default=4)
    ap.add_argument("--strip-vocab", action="store_true")
    a = ap.parse_args()
    if a.strip_vocab:
        a.model = str(strip_vocab(a.model, "/tmp/gpu_cycles_model.gguf"))

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
        if (i + 1) % 10 == 0:
            print(f"cycle {i + 1}/{a.n}", flush=True)
    mib = 1 << 20
    for n, alloc, reserved, pinned, r in rows:
        print(f"after cycle {n:3d}: VRAM allocated {alloc / mib:8.1f} MiB, reserved {reserved / mib:8.1f} MiB, "
              f"pinned host {pinned / mib if pinned >= 0 else float('nan'):8.1f} MiB, RSS {r / mib:8.1f} MiB")
    (n0, a0, r0, p0, s0), (n1, a1, r1, p1, s1) = rows
    print(f"moved over cycles {n0}..{n1}: VRAM allocated {(a1 - a0) / mib:+.1f} MiB, reserved {(r1 - r0) / mib:+.1f} MiB, "
          f"pinned {(p1 - p0) / mib:+.1f} MiB, RSS {(s1 - s0) / mib:+.1f} MiB")


if __name__ == "__main__":
    main()
