"""The copy-bound prefill rate of a streamed model on this GPU: the bytes one prompt streams (every
streamed layer once: layer-major) copied from lstream's own pinned arena into a ring slot, back to
back on the copy stream, timed by CUDA events; tokens / that time is the rate no streamed prompt can
pass. For #15's `-ngl 0 -ub 2048` row, measured in the same call as the bench it bounds.

    python -m lstream.tools.copy_bound MODEL.gguf -ngl 0 -p 2048 [-r 5]
"""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-ngl", type=int, default=0)
    ap.add_argument("-p", type=int, default=2048, help="prompt tokens the rate is given for")
    ap.add_argument("-r", type=int, default=5, help="repetitions (the best is kept)")
    a = ap.parse_args(argv)
    import torch

    from ..api import Model
    from ..backends.cuda import CUDABackend
    from ..loaders.model_file import load_model
    m = Model(load_model(a.model), n_gpu_layers=a.ngl, device_backend=CUDABackend(), load_tokenizer=False)
    try:
        be = m.device_backend
        st = be._ensure_streamer()
        rt, slot = be.rt, st.slots[0]
        layers = sorted(st.staging.layer_range)
        total = sum(st.staging.layer_range[layer][1] for layer in layers)
        best = None
        for _ in range(a.r + 1):  # the first pass warms the copy path
            t0, t1 = rt.new_event(timing=True), rt.new_event(timing=True)
            t0.record(rt.copy_stream)
            for layer in layers:
                off, n = st.staging.layer_range[layer]
                rt.copy(slot.buf[:n], st.staging.buf[off:off + n], rt.copy_stream)
            t1.record(rt.copy_stream)
            t1.synchronize()
            ms = t0.elapsed_time(t1)
            best = ms if best is None else min(best, ms)
        print(f"copy bound: {len(layers)} streamed layers, {total / 1e9:.3f} GB in {best:.2f} ms "
              f"({total / best / 1e6:.1f} GB/s, pinned {st.staging.pinned}): pp{a.p} at most "
              f"{a.p / best * 1e3:.0f} t/s, 90% = {0.9 * a.p / best * 1e3:.0f} t/s ({torch.cuda.get_device_name()})")
    finally:
        m.close()


if __name__ == "__main__":
    main()
