"""Where the host time of a decode step goes: cProfile of N eager steps (graphs off), then the
step time with CUDA graphs, for one model and -ngl/policy.

    python -m lstream.tools.profile_decode MODEL.gguf -ngl 33 [--policy split:14] [-n 16]
"""
from __future__ import annotations

import cProfile
import pstats
import time

import click


@click.command()
@click.argument("model")
@click.option("-ngl", "ngl", type=int, default=99)
@click.option("--policy", default="auto")
@click.option("-n", "n", type=int, default=16)
@click.option("--top", type=int, default=18)
@click.option("--kernels", is_flag=True, help="also the GPU time per kernel of eager steps (torch.profiler)")
@click.option("--ncmoe", type=int, default=0, help="the experts of the first N layers in host memory (and the "
              "graphs' steps profiled too: their host work is the MoE orchestration)")
@click.option("--mixed", is_flag=True, help="only the steps with graphs, under cProfile (mixed decode: the "
              "CPU's layers, the hops and the eager streamed layers between the replayed segments)")
def main(model, ngl, policy, n, top, kernels, ncmoe, mixed):
    from ..api import Model
    from ..core.policy import make_policy
    from ..loaders.model_file import load_model
    cal = None
    if policy == "cost":
        from ..backends.calibrate import load_or_measure
        cal = load_or_measure()
    for graphs in ((True,) if mixed else (False, True)):
        m = Model(load_model(model), n_gpu_layers=ngl, policy=make_policy(policy, calibration=cal), n_ctx=512,
                  load_tokenizer=False, cuda_graphs=graphs, n_cpu_moe=ncmoe)
        m.eval([1, 2, 3, 4])
        for t in range(3):  # warm up (and capture)
            m.eval([5 + t])
        m.synchronize()
        prof = cProfile.Profile() if not graphs or ncmoe or mixed else None
        if graphs and not ncmoe and not mixed:
            _host_share(m, n)
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        for t in range(n):
            m.eval([10 + t])
        m.synchronize()
        if prof:
            prof.disable()
        dt = (time.perf_counter() - t0) / n
        print(f"graphs={graphs}: {dt * 1e3:.2f} ms/token ({1 / dt:.1f} t/s), policy {m.policy.describe()}")
        if not graphs:
            from ..backends.cuda import selfcheck
            print(f"kernels proven here: {selfcheck._RESULTS}, timed (us): {selfcheck.TIMES}")
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(top)
            if mixed:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
        if kernels and not graphs:
            _kernel_table(m, n, top)
        m.close()


def _host_share(m, n: int) -> None:
    """With graphs: the captured step replayed back to back (GPU alone) against whole eval() steps
    (GPU + the host's turnaround between them: inputs, logits to host, checks, Python)."""
    import torch
    rep = m.runner.replay
    if rep is None or not rep._graphs:
        print("no captured graph to replay")
        return
    # the one-token step's graph (not the warm-up prompt's)
    graph = next(v[1] for k, v in rep._graphs.items() if k[0] == "whole" and k[-1] == 1)
    for _ in range(3):
        rep.be.replay(graph)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        rep.be.replay(graph)
    torch.cuda.synchronize()
    g = (time.perf_counter() - t0) / n
    launch = []
    for _ in range(n):  # the host's time in one launch, the device idle before it (as between tokens)
        t1 = time.perf_counter()
        rep.be.replay(graph)
        launch.append(time.perf_counter() - t1)
        torch.cuda.synchronize()
    print(f"graph launch (host, device idle): median {sorted(launch)[n // 2] * 1e6:.0f} us")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for t in range(n):
        m.eval([50 + t])
    m.synchronize()
    prof.disable()
    e = (time.perf_counter() - t0) / n
    print(f"graph replayed back to back: {g * 1e3:.3f} ms/step; eval() steps (under cProfile): {e * 1e3:.3f} ms")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def _kernel_table(m, n: int, top: int) -> None:
    """GPU time per kernel name over n eager steps: what a graph replay of the step spends."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for t in range(n):
            m.eval([30 + t])
        m.synchronize()
    ev = [e for e in p.key_averages() if e.device_time_total > 0]
    ev.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in ev)
    print(f"GPU kernel time per step: {total / n / 1e3:.3f} ms in {sum(e.count for e in ev) / n:.0f} kernels")
    for e in ev[:top]:
        print(f"  {e.device_time_total / n:9.1f} us/step  {e.count / n:6.1f}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
