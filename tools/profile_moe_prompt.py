"""A prompt with host experts (-ncmoe) on the device's clock: when each expert copy and each expert
GEMM ran, from CUDA events recorded around them (no syncs added), to see whether the copies run
back to back at PCIe speed and what the compute waits for.

    python -m lstream.tools.profile_moe_prompt MODEL.gguf --ncmoe 8 -p 2048 -ub 512
"""
from __future__ import annotations

import time

import click


@click.command()
@click.argument("model")
@click.option("--ncmoe", type=int, default=99)
@click.option("-p", "n_prompt", type=int, default=2048)
@click.option("-ub", "ubatch", type=int, default=512)
@click.option("--rows", type=int, default=24, help="timeline rows printed")
def main(model, ncmoe, n_prompt, ubatch, rows):
    import numpy as np
    import torch

    from ..api import Model
    from ..backends.cuda import moe_kernels as mk
    from ..loaders.model_file import load_model
    m = Model(load_model(model), n_gpu_layers=99, n_ctx=n_prompt + 64, n_ubatch=ubatch, load_tokenizer=False,
              n_cpu_moe=ncmoe)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, m.config.vocab_size, n_prompt).tolist()
    m.eval(toks)  # warm up: kernels compiled, graphs captured, slots allocated
    m.reset()
    m.synchronize()
    rt = m.device_backend.rt
    cs = rt.copy_stream
    marks: list = []  # (kind, nbytes, start event, end event)
    copy0, prefill0 = rt.copy, mk.prefill

    def copy(dst, src, stream):
        if stream is not cs:
            return copy0(dst, src, stream)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record()
            copy0(dst, src, stream)
            b.record()
        marks.append(("copy", dst.numel() * dst.element_size(), a, b))

    def prefill(*a, **kw):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        out = prefill0(*a, **kw)
        e1.record()
        marks.append(("gemm", 0, e0, e1))
        return out
    rt.copy, mk.prefill = copy, prefill
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    m.eval(toks)
    m.synchronize()
    wall = time.perf_counter() - t0
    rt.copy, mk.prefill = copy0, prefill0
    print(f"pp{n_prompt} -ub {ubatch} -ncmoe {ncmoe}: {wall * 1e3:.1f} ms ({n_prompt / wall:.0f} t/s)")
    cp = [(start.elapsed_time(a), start.elapsed_time(b), n) for k, n, a, b in marks if k == "copy"]
    gm = [(start.elapsed_time(a), start.elapsed_time(b)) for k, _, a, b in marks if k == "gemm"]
    if cp:
        busy = sum(b - a for a, b, _ in cp)
        nbytes = sum(n for *_, n in cp)
        gaps = sum(max(0.0, cp[i + 1][0] - cp[i][1]) for i in range(len(cp) - 1))
        print(f"copies: {len(cp)}, {nbytes / 1e9:.2f} GB in {busy:.1f} ms busy ({nbytes / busy / 1e6:.1f} GB/s), "
              f"{gaps:.1f} ms of gaps between them, first at {cp[0][0]:.1f} ms, last done {cp[-1][1]:.1f} ms")
    if gm:
        print(f"expert GEMMs: {len(gm)}, {sum(b - a for a, b in gm):.1f} ms busy, last done {gm[-1][1]:.1f} ms")
    print("timeline (ms from the prompt's start):")
    ev = sorted([(a, b, f"copy {n / 1e6:6.1f} MB") for a, b, n in cp] + [(a, b, "gemm") for a, b in gm])
    for a, b, what in ev[:rows]:
        print(f"  {a:8.2f} .. {b:8.2f}  {what}")
    m.close()


if __name__ == "__main__":
    main()
