"""Is the decode FFN share's gain real in steady state?  One model and split, decode steps with the
device's share of the CPU layers' FFN at each fraction in turn, alternated over rounds in one process
(the hosts lent with the H200 drift by tens of percent between calls and between seconds).

    python -m lstream.tools.share_ab MODEL.gguf -ngl 16 --split 14 --shares 0,0.45 [-n 32] [--rounds 4]

Per round and share: ms per token (mean, median, min) of n successive steps, each one eval + sync,
as the bench's decode runs them; with --waits also the ms per token the CPU spent in the share's
start (handing x over, launching) and finish (waiting for the device's columns, adding them)."""
from __future__ import annotations

import statistics
import time

import click


@click.command()
@click.argument("model")
@click.option("-ngl", "ngl", type=int, default=16)
@click.option("--split", "split", type=int, required=True, help="CPU layers of the split (split:N)")
@click.option("--shares", default="0,0.45")
@click.option("-n", "n", type=int, default=32)
@click.option("--rounds", type=int, default=4)
@click.option("--waits", is_flag=True, help="time the share's start and finish calls")
def main(model, ngl, split, shares, n, rounds, waits):
    from ..api import Model
    from ..core.policy import LayerSplit
    from ..loaders.model_file import load_model
    fr = [float(s) for s in shares.split(",")]
    spent = {"start": 0.0, "finish": 0.0}
    if waits:
        from ..backends.cuda.ffn_share import FFNShare
        for name in spent:
            def timed(*a, _f=getattr(FFNShare, name), _k=name):
                t0 = time.perf_counter()
                _f(*a)
                spent[_k] += time.perf_counter() - t0
            setattr(FFNShare, name, timed)
    m = Model(load_model(model), n_gpu_layers=ngl, policy=LayerSplit(split), n_ctx=512, load_tokenizer=False)
    m.eval([1, 2, 3, 4])
    start = m.kv.n_past
    seen = {f: [] for f in fr}
    for r in range(rounds):
        for f in fr:
            m.policy.share = f
            m._plans.clear()
            m._apply_share()
            m.kv.n_past = start
            for t in range(2):  # plans, programs and graphs of this share: not counted
                m.eval([5 + t])
            m.synchronize()
            ts = []
            for k in spent:
                spent[k] = 0.0
            for t in range(n):
                t0 = time.perf_counter()
                m.eval([7 + t % 50])
                m.synchronize()
                ts.append(1e3 * (time.perf_counter() - t0))
            seen[f] += ts
            print(f"round {r} share {f:.2f}: mean {statistics.mean(ts):6.1f} median {statistics.median(ts):6.1f} "
                  f"min {min(ts):6.1f} max {max(ts):6.1f} ms/token"
                  + (f"; in start {1e3 * spent['start'] / n:5.2f}, finish {1e3 * spent['finish'] / n:5.2f} ms/token"
                     if waits else ""), flush=True)
    for f, ts in seen.items():
        print(f"all rounds share {f:.2f}: mean {statistics.mean(ts):6.1f} median {statistics.median(ts):6.1f} ms/token "
              f"({1e3 / statistics.mean(ts):.2f} t/s)")


if __name__ == "__main__":
    main()
