"""Runs a plan: feeds each split its inputs (copied between backends at split boundaries),
calls the backends op by op and frees values after their last use. It never decides placement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .graph import INPUT, Graph
from .kv_cache import KVCache
from .residency import HOST, ResidencyMap
from .scheduler import Plan


@dataclass
class Profile:
    """Seconds per phase, summed over runs; filled by the executor and the backends."""
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    bytes_uploaded: int = 0
    bytes_hopped: int = 0
    # Per layer and phase (core/profile.py prints them); spans only when a trace is asked for.
    layer_seconds: dict[tuple[int, str], float] = field(default_factory=dict)
    spans: list | None = None  # [track, name, t0, t1, layer] in perf_counter seconds
    sync_device: bool = False  # synchronize a device backend after each op, so its time is its own

    def add_layer(self, layer: int, phase: str, t0: float, t1: float, track: str | None = None) -> None:
        key = (layer, phase)
        self.layer_seconds[key] = self.layer_seconds.get(key, 0.0) + (t1 - t0)
        if self.spans is not None:
            last = self.spans[-1] if self.spans else None
            if last is not None and last[0] == (track or phase) and last[4] == layer and last[1] == phase:
                last[3] = t1  # consecutive ops of one layer on one track: one span
            else:
                self.spans.append([track or phase, phase, t0, t1, layer])

    def add(self, phase: str, seconds: float, n: int = 1) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.counts[phase] = self.counts.get(phase, 0) + n

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()
        self.bytes_uploaded = self.bytes_hopped = 0
        self.layer_seconds.clear()
        if self.spans is not None:
            self.spans.clear()


@dataclass
class RunContext:
    tokens: np.ndarray  # (n_tokens,) int32 token ids
    positions: np.ndarray  # (n_tokens,) int64 absolute positions
    n_past: int  # tokens already in the K/V cache
    kv: KVCache
    residency: ResidencyMap
    logits: str = "last"  # "last": only the last token's logits; "all": every token's
    profile: Profile | None = None
    more_ubatches: bool = False  # another ubatch of the same prompt follows (a streamer may prefetch)


class Executor:
    def __init__(self, graph: Graph, backends: dict):
        self.graph = graph
        self.backends = backends
        self.last_use = graph.last_use()

    def run(self, plan: Plan, ctx: RunContext) -> np.ndarray:
        values: dict[int, dict[str, object]] = {}  # node id -> {backend name: value there}
        prof = ctx.profile
        used = [self.backends[name] for name in dict.fromkeys(s.backend for s in plan.splits)]
        for b in used:
            b.begin_run(plan, ctx)
        try:
            for split in plan.splits:
                backend = self.backends[split.backend]
                for i in split.copy_inputs:  # the one place activations cross backends
                    if split.backend not in values[i]:
                        src, val = next(iter(values[i].items()))
                        t0 = time.perf_counter()
                        host = self.backends[src].to_host(val)
                        values[i][split.backend] = backend.from_host(host)
                        if prof is not None:
                            t1 = time.perf_counter()
                            prof.add("hop", t1 - t0)
                            prof.bytes_hopped += host.nbytes
                            prof.add_layer(split.assignments[0].node.layer, "hop", t0, t1, "hop")
                t0 = time.perf_counter()
                for a in split.assignments:
                    node = a.node
                    args = [ctx.tokens if i == INPUT else values[i][split.backend] for i in node.inputs]
                    t_op = time.perf_counter() if prof is not None else 0.0
                    values[node.id] = {split.backend: backend.compute(node, args, ctx)}
                    if prof is not None:
                        if prof.sync_device and split.backend != HOST:
                            backend.synchronize()
                        prof.add_layer(node.layer, f"{split.backend} compute", t_op, time.perf_counter(),
                                       split.backend)
                    for i in node.inputs:
                        if i != INPUT and self.last_use[i] == node.id:
                            del values[i]
                if prof is not None:
                    prof.add(f"{split.backend} compute", time.perf_counter() - t0)
            src, out = next(iter(values[self.graph.output].items()))
            return np.asarray(self.backends[src].to_host(out), dtype=np.float32)
        finally:
            for b in used:
                b.end_run()
