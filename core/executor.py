"""Runs a plan: feeds each split its inputs (copied between backends at split boundaries),
calls the backends op by op and frees values after their last use. It never decides placement.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .errors import NonFiniteError
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
    ubatch: int = 0  # index of this ubatch in a layer-major group (core/runner.py)
    graph: object = None  # static inputs of a replayable step (core/replay.py, Backend.step_inputs)
    # Several sequences in one ubatch (continuous batching): a core.paged_kv.SeqBatch (each token's
    # sequence, K/V slot and block table); kv is then a PagedKVCache and attention reads through it
    batch: object = None


class Fused:
    """A run of one split's nodes that its backend computes in one call (backends/cpu/program.py):
    nodes [k0, k1) of the split, reading `inputs` and making `outputs` (node ids); ids: its nodes."""
    nodes: list
    k0: int
    k1: int
    inputs: list[int]
    outputs: list[int]
    ids: frozenset

    def run(self, args: list, ctx: "RunContext") -> list:
        raise NotImplementedError


class Executor:
    def __init__(self, graph: Graph, backends: dict):
        self.graph = graph
        self.backends = backends
        self.last_use = graph.last_use()
        self._compiled: dict = {}  # (plan id, split, n_tokens, logits, profiled) -> (plan, units or None)

    def run(self, plan: Plan, ctx: RunContext, to_host: bool = True, check: bool = False):
        """Run one ubatch; returns the output as float32 numpy (or the backend's value, to_host=False).
        check: every node's value checked for NaN/inf, op by op (see steps)."""
        with self.session(plan, ctx):
            out: list = []
            for _ in self.steps(plan, ctx, out, to_host, values={}, fuse=not check, check=check):
                pass
            return out[0] if out else None

    def used_backends(self, plan: Plan) -> list:
        return [self.backends[name] for name in dict.fromkeys(s.backend for s in plan.splits)]

    @contextmanager
    def session(self, plan: Plan, ctx: RunContext):
        """begin_run/end_run around one plan's run (end_run also when it fails)."""
        used = self.used_backends(plan)
        for b in used:
            b.begin_run(plan, ctx)
        try:
            yield
        finally:
            for b in used:
                b.end_run()

    @staticmethod
    @contextmanager
    def group_session(runs):
        """begin_group/end_group around the ubatches of one prompt run layer by layer, runs being
        (executor, plan, context) in order: each context is told its ubatch index."""
        used: dict[str, object] = {}
        for k, (ex, plan, ctx) in enumerate(runs):
            ctx.ubatch = k
            for b in ex.used_backends(plan):
                used[b.name] = b
        for b in used.values():
            b.begin_group([(plan, ctx) for _, plan, ctx in runs])
        try:
            yield
        finally:
            for b in used.values():
                b.end_group()

    def run_part(self, plan: Plan, ctx: RunContext, values: dict, start: int = 0, stop: int | None = None,
                 to_host: bool | None = None):
        """Assignments [start, stop) of a plan inside a session; returns the output when the part
        reaches the end and to_host is not None (see steps)."""
        out: list = []
        for _ in self.steps(plan, ctx, out, to_host, values=values, start=start, stop=stop):
            pass
        return out[0] if out else None

    def value_on(self, where: dict, backend):
        """A value ({backend name: value}) on `backend`, copied there through the host if needed."""
        if backend.name in where:
            return where[backend.name]
        src, v = next(iter(where.items()))
        return backend.from_host(self.backends[src].to_host(v))

    def steps(self, plan: Plan, ctx: RunContext, out: list, to_host: bool = True, values: dict | None = None,
              start: int = 0, stop: int | None = None, fuse: bool = True, check: bool = False):
        """Generator: runs the plan node by node and yields the layer of the next node whenever the
        layer changes (before any of its work), so ubatches can be interleaved layer by layer.
        Appends the output to `out` at the end (None when to_host is None). Part of a plan:
        assignments [start, stop) in plan order, `values` holding what earlier ones made (a run that
        stops early leaves there the values later assignments need). fuse: let a backend run a
        compiled run of nodes in one call (it then yields only before the run's first node).
        check: every node's value checked for NaN/inf (slow: finds where a non-finite value first
        appeared, after a run's checks at backend boundaries saw one)."""
        values = {} if values is None else values  # node id -> {backend name: value there}
        prof = ctx.profile
        layer = None
        k = 0  # plan-order index of the next node
        for si, split in enumerate(plan.splits):
            backend = self.backends[split.backend]
            hopped = False
            for unit in self._units(plan, si, split, backend, ctx, k, start, stop, fuse):
                nodes = unit.nodes if isinstance(unit, Fused) else (unit,)
                k0, k = k, k + len(nodes)
                if k0 < start:
                    continue
                if stop is not None and k0 >= stop:
                    return
                if nodes[0].layer != layer:
                    layer = nodes[0].layer
                    yield layer
                if not hopped:
                    hopped = True
                    self._hop(split, backend, values, prof)
                t_op = time.perf_counter() if prof is not None else 0.0
                if not isinstance(unit, Fused):
                    node = unit
                    args = [ctx.tokens if i == INPUT else values[i][split.backend] for i in node.inputs]
                    values[node.id] = {split.backend: backend.compute(node, args, ctx)}
                    if check:
                        self.check_finite(np.asarray(backend.to_host(values[node.id][split.backend])), node.id,
                                          split.backend)
                    dead = [i for i in node.inputs if i != INPUT and self.last_use[i] == node.id]
                else:
                    outs = unit.run([values[i][split.backend] for i in unit.inputs], ctx)
                    for i, v in zip(unit.outputs, outs):
                        values[i] = {split.backend: v}
                    dead = [i for i in unit.inputs if self.last_use[i] in unit.ids]
                    layer = nodes[-1].layer
                if prof is not None:
                    if prof.sync_device and split.backend != HOST:
                        backend.synchronize()
                    t1 = time.perf_counter()
                    prof.add(f"{split.backend} compute", t1 - t_op, 0)
                    prof.add_layer(nodes[0].layer, f"{split.backend} compute", t_op, t1, split.backend)
                for i in dead:
                    values.pop(i, None)
            if prof is not None:
                prof.counts[f"{split.backend} compute"] = prof.counts.get(f"{split.backend} compute", 0) + 1
        if to_host is None:
            out.append(None)
            return
        src, val = next(iter(values[self.graph.output].items()))
        if not to_host:
            out.append(val)
            return
        logits = np.asarray(self.backends[src].to_host(val), dtype=np.float32)
        self.check_finite(logits, self.graph.output, src)
        out.append(logits)

    def forget_compiled(self) -> None:
        """Compile splits again (a backend's weights for them changed)."""
        self._compiled.clear()

    def _units(self, plan, si, split, backend, ctx, k, start, stop, fuse):
        """A split's nodes, with the runs its backend compiled (compile_split) as single units where
        they lie wholly inside [start, stop)."""
        compiled = None
        if fuse:
            key = (id(plan), si, len(ctx.tokens), ctx.logits, ctx.profile is not None)
            hit = self._compiled.get(key)
            if hit is None or hit[0] is not plan:
                hit = self._compiled[key] = (plan, backend.compile_split(split.assignments, self.last_use, ctx))
            compiled = hit[1]
        if compiled is None:
            yield from (a.node for a in split.assignments)
            return
        for unit in compiled:
            if not isinstance(unit, Fused):
                yield unit
            elif start <= k + unit.k0 and (stop is None or k + unit.k1 <= stop):
                yield unit
            else:
                yield from unit.nodes

    def _hop(self, split, backend, values, prof) -> None:
        """The one place activations cross backends: a split's inputs made elsewhere."""
        for i in split.copy_inputs:
            if i in values and split.backend not in values[i]:  # (a part of a plan: may be used up)
                src, val = next(iter(values[i].items()))
                t0 = time.perf_counter()
                host = self.backends[src].to_host(val)
                self.check_finite(host, i, src)
                values[i][split.backend] = backend.from_host(host)
                if prof is not None:
                    t1 = time.perf_counter()
                    prof.add("hop", t1 - t0)
                    prof.bytes_hopped += host.nbytes
                    prof.add_layer(split.assignments[0].node.layer, "hop", t0, t1, "hop")

    def check_finite(self, host: np.ndarray, node_id: int, backend: str) -> None:
        """Values crossing backends and the logits are checked (a few us for a decode step): a
        NaN or an infinity is reported with the node that made it, not carried into a kernel."""
        # (one dot product first: NaN/inf make it non-finite; only then, or on overflow, the full test)
        if host.dtype.kind == "f" and not np.isfinite(np.dot(flat := host.reshape(-1), flat)) \
                and not np.isfinite(host).all():
            node = self.graph.nodes[node_id]
            raise NonFiniteError(
                f"non-finite values (NaN or inf) after {node.name} ({node.op.value}, layer {node.layer}, "
                f"computed on {backend}): the activations overflowed or the weights hold NaN/inf")
