"""Where a serve step's time goes, without HTTP: the continuous-batching engine (core/batching.py)
on SmolLM2 (or -m), N greedy requests of -n tokens submitted together, aggregate tokens/s, then
the cProfile of the same run (top functions by own time).

    python -m lstream.tools.profile_serve [-m MODEL] [--requests 1,8] [-n 48] [-t 2] [--top 18] [--act8 0|1]
        [-ngl N] [--policy auto] [--phases]

--phases: the per-phase table (core/profile.py, device synchronized after each op) of each size's run
instead of the cProfile."""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a bicycle works to a ten-year-old.",
           "List some interesting facts about the ocean.", "Describe a walk through a forest in autumn."]


def _go(model, eng, n_req: int, n_tok: int) -> tuple[float, int]:
    from ..core.serve_request import GenParams, GenRequest
    reqs = [GenRequest(model.tokenize(PROMPTS[i % len(PROMPTS)]), GenParams(max_tokens=n_tok, temperature=0,
                                                                            ignore_eos=True), emit=lambda ev: None)
            for i in range(n_req)]
    for r in reqs:
        eng.submit(r)
    t0, steps = time.perf_counter(), 0
    while any(r.finish_reason is None for r in reqs) and (eng.active or eng.waiting):
        eng.step()
        steps += 1
    return n_tok * n_req / (time.perf_counter() - t0), steps


def main(argv=None) -> None:
    import lstream
    from ..core.batching import Engine
    from ..loaders.registry import resolve
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--requests", default="1,8")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--act8", type=int, default=1, help="1: int8 activations for Q4_0/Q4_1 (serve's default)")
    ap.add_argument("-ngl", type=int, default=0)
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--phases", action="store_true")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.requests.split(",")]
    from ..core.options import Options
    from ..core.policy import make_policy
    from ..core.profile import profiling
    model = lstream.load(str(resolve(a.model)), n_ctx=max(4096, 256 * max(sizes)), n_threads=a.threads,
                         n_gpu_layers=a.ngl, policy=make_policy(a.policy), options=Options.from_env(cpu_act8=bool(a.act8)))
    eng = Engine(model, n_slots=max(sizes), chunk=64)
    _go(model, eng, max(sizes), 8)  # compile and warm up
    for n in sizes:
        tps, steps = _go(model, eng, n, a.n)
        print(f"{n} requests x {a.n} tokens: {tps:.1f} t/s aggregate, {steps} steps")
    for n in sizes:
        if a.phases:
            with profiling(model, title=f"-- phases, {n} requests"):
                _go(model, eng, n, a.n)
            continue
        prof = cProfile.Profile()
        prof.enable()
        _go(model, eng, n, a.n)
        prof.disable()
        print(f"-- cProfile, {n} requests")
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
