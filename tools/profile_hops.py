"""Where a host-expert decode step goes (--cpu-moe / -ncmoe, CUDA graphs on): wall time per phase of
each layer's hop, by timers around the calls (no cProfile: its overhead is the size of the hop).

    python -m lstream.tools.profile_hops MODEL.gguf --ncmoe 8 -n 32

Phases: `replay` (a graph launch), `read_back` (the device values copied down, waiting for the
segment), `route`, `experts` (the grouped expert kernel), `send_up`, `copy_in`, `rest` (the Python
around them); with the hops in one graph (core/hop_replay.py): `wait_post` (the host spinning until
the device posts a hop: the device's part of a layer and the flag's latency), `moe_hop` (route and
experts), `answer`. Then the expert kernel alone on the same inputs, back to back, and after a
sleep as long as a segment: what the engine's context adds to it.
"""
from __future__ import annotations

import time
from collections import defaultdict

import click
import numpy as np


def _timed(obj, attr: str, acc: dict, key: str):
    f = getattr(obj, attr)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            acc[key] += time.perf_counter() - t0
            acc[key + "#"] += 1
    setattr(obj, attr, wrapper)
    return f


@click.command()
@click.argument("model")
@click.option("--ncmoe", type=int, default=99)
@click.option("-n", "n", type=int, default=32)
@click.option("-t", "threads", type=int, default=None)
@click.option("--shares", default="0,3", help="--moe-share values to time in turn")
def main(model, ncmoe, n, threads, shares):
    from ..api import Model
    from ..backends.cpu import moe as cmoe
    from ..loaders.model_file import load_model
    import numba
    m = Model(load_model(model), n_gpu_layers=99, n_ctx=512, load_tokenizer=False, n_cpu_moe=ncmoe,
              n_threads=threads)
    m.eval([1, 2, 3, 4])
    for t in range(4):
        m.eval([5 + t])
    m.synchronize()
    print(f"CPU threads {m.cpu.n_threads}, numba's threading layer {numba.threading_layer()}")
    _share_check(m, shares)
    rep = m.runner.replay
    be = rep.be
    acc: dict = defaultdict(float)
    K = cmoe.K
    from ..core.hop_mailbox import HostMailbox
    from ..core.hop_replay import HopReplay
    from ..backends.cuda.hop_share import HopShare
    saved = [(HostMailbox, "wait_posted", _timed(HostMailbox, "wait_posted", acc, "wait_post")),
             (HostMailbox, "answer", _timed(HostMailbox, "answer", acc, "answer")),
             (m.cpu, "moe_hop", _timed(m.cpu, "moe_hop", acc, "moe_hop")),
             (be, "replay", _timed(be, "replay", acc, "replay")),
             (be, "read_back", _timed(be, "read_back", acc, "read_back")),
             (be, "send_up", _timed(be, "send_up", acc, "send_up")),
             (be, "copy_into", _timed(be, "copy_into", acc, "copy_in")),
             (K, "route", _timed(K, "route", acc, "route")),
             (m.cpu, "moe_route", _timed(m.cpu, "moe_route", acc, "moe_route")),
             (m.cpu, "moe_experts", _timed(m.cpu, "moe_experts", acc, "moe_experts")),
             (HopShare, "issue", _timed(HopShare, "issue", acc, "share_issue")),
             (HopReplay, "_serve", _timed(HopReplay, "_serve", acc, "serve")),
             (K, "pairs_ffn", _timed(K, "pairs_ffn", acc, "experts"))]
    last = {}
    f_pairs = saved[-1][2]

    def keep(*a):  # the last call's arguments, for the kernel alone below
        last["a"] = a
        return f_pairs(*a)
    K.pairs_ffn = keep
    _timed(K, "pairs_ffn", acc, "experts")
    for share in [int(v) for v in shares.split(",")]:
        be.moe_share = share
        for t in range(3):
            m.eval([40 + t])
        m.synchronize()
        acc.clear()
        t0 = time.perf_counter()
        for t in range(n):
            m.eval([10 + t])
        m.synchronize()
        wall = (time.perf_counter() - t0) / n
        hops = max(acc["read_back#"], acc["wait_post#"]) / n
        path = "hops in one graph" if acc["wait_post#"] else "replayed segments"
        print(f"--moe-share {share} ({path}): {wall * 1e3:.2f} ms/token ({1 / wall:.1f} t/s), {hops:.0f} hops a "
              f"token; per hop (us):")
        _report(acc, wall, n)
    for obj, attr, f in saved:
        setattr(obj, attr, f)
    if last.get("a") is not None:
        _kernel_alone(f_pairs, last["a"])
    m.close()


def _share_check(m, shares: str) -> None:
    """The share changes no logits: each --moe-share value against 0's."""
    ref = None
    for share in [0] + [int(v) for v in shares.split(",") if int(v)]:
        m.device_backend.moe_share = share
        m.reset()
        m.eval([1, 2, 3, 4])
        out = np.concatenate([m.eval([5 + t]) for t in range(3)])
        if ref is None:
            ref = out
            continue
        same = (out.reshape(3, -1).argmax(1) == ref.reshape(3, -1).argmax(1)).all()
        print(f"--moe-share {share}: logits' max difference to 0's {np.abs(out - ref).max() / np.abs(ref).max():.2e} "
              f"of their largest, greedy tokens {'equal' if same else 'DIFFER'}")


def _report(acc: dict, wall: float, n: int) -> None:
    named = 0.0
    inner = ("route", "experts") if acc["moe_hop#"] else ("route",) if acc["moe_route#"] else ()
    for k in ("replay", "wait_post", "read_back", "moe_hop", "moe_route", "share_issue", "moe_experts", "route",
              "experts", "answer", "send_up", "copy_in"):
        if not acc[k + "#"]:
            continue
        per = acc[k] / acc[k + "#"] * 1e6
        named += acc[k] if k not in inner else 0.0  # (inside moe_hop / moe_route)
        print(f"  {k:10s} {per:8.1f} us x {acc[k + '#'] / n:5.1f}/token = {acc[k] / n * 1e3:7.3f} ms/token")
    if acc["moe_experts#"]:
        named -= acc["experts"]  # (inside moe_experts)
    print(f"  {'rest':10s} {(wall * n - named) / n * 1e3:7.3f} ms/token (Python, checks, the device share, the head)")
    if acc["serve#"]:
        print(f"  outside the hops (launch, the layers after the last hop, the head, logits): "
              f"{(wall * n - acc['serve']) / n * 1e3:7.3f} ms/token")


def _kernel_alone(f_pairs, a) -> None:
    for pause in (0.0, 50e-6, 200e-6):
        ts = []
        for _ in range(50):
            if pause:
                t1 = time.perf_counter()
                while time.perf_counter() - t1 < pause:  # busy, as the main thread waiting on the GPU
                    pass
            t1 = time.perf_counter()
            f_pairs(*a)
            ts.append(time.perf_counter() - t1)
        print(f"expert kernel alone after {pause * 1e6:.0f} us idle: median {np.median(ts) * 1e6:.0f} us, "
              f"min {min(ts) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
