"""The host's expert compute of a decode step alone (CPU backend, no device): one MoE op's routed
experts per call, a different routing each call (so the experts come from memory, not the cache),
timed with int16 and int8 activations; GB/s counts the routed experts' bytes.

    python -m lstream.tools.bench_cpu_moe MODEL.gguf [-t 16] [-n 200] [--act 8]

The row dots' software prefetch distance is LSTREAM_CPU_PREFETCH (bytes; compiled in: give each value
its own NUMBA_CACHE_DIR).
"""
from __future__ import annotations

import time

import click
import numpy as np


@click.command()
@click.argument("model")
@click.option("-t", "threads", default="", help="CPU threads (comma list; default: the engine's)")
@click.option("-n", "n", type=int, default=200, help="calls per setting")
@click.option("--act", type=click.Choice(["both", "16", "8"]), default="both", help="activations: int16, int8 or both")
def main(model, threads, n, act):
    from ..api import Model
    from ..core.ops import Op
    from ..core.options import Options
    from ..loaders.model_file import load_model
    for act8 in {"both": (False, True, False, True), "16": (False,), "8": (True,)}[act]:
        m = Model(load_model(model), device=None, n_ctx=64, load_tokenizer=False, options=Options(cpu_act8=act8))
        cpu = m.by_name["cpu"]
        nodes = [nd for nd in m.graph.nodes if nd.op is Op.MOE]
        e = m.residency[nodes[0].weights[0]]
        k = nodes[0].params["top_k"]
        per_expert = sum(m.residency[w].nbytes for w in nodes[0].weights[:3]) / e.n_expert
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, e.shape[2])).astype(np.float32)
        logits = rng.standard_normal((n, 1, e.n_expert)).astype(np.float32) * 4
        for t in ([int(v) for v in threads.split(",")] if threads else [cpu.n_threads]):
            cpu.set_threads(t)
            for i in range(10):
                cpu.moe_decode(nodes[i % len(nodes)], x, logits[i])
            t0 = time.perf_counter()
            for i in range(n):
                cpu.moe_decode(nodes[i % len(nodes)], x, logits[i])
            dt = (time.perf_counter() - t0) / n
            print(f"act8={act8!s:5} threads={t:2}: {dt * 1e6:7.1f} us per MoE op, "
                  f"{k * per_expert / dt / 1e9:5.1f} GB/s of routed experts")
        m.close()


if __name__ == "__main__":
    main()
