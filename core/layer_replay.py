"""A layer-major prompt in static form, each (layer, ubatch) replayed from a captured graph: a run
strategy chosen by core/runner.py for prompts whose layers stream.

Layer-major order (runner.run_layer_major) makes a streamed layer cross PCIe once per prompt, but
run eagerly each ubatch of each layer costs ~15 launches through Python: at -ub 512 the host, not
the copy or the GPU, set the pace (tools/gpu_notes.md). Here every block layer of every ubatch runs
in static form (positions in a device buffer, attention by device-side position; a host layer's
K/V in a device stand-in filled once per layer and written back once), so the launches of one
(layer, ubatch, ring slot) are captured once and replayed for every later prompt at any depth.
Around the replays the host only drives the ring (acquire before a layer's first ubatch, release
after its last) and the host K/V. The embedding and the output head run eagerly.

Only the residual stream may cross a layer's bounds (a single value in, a single value out, kept in
one static buffer per ubatch); a plan where more crosses keeps the eager layer-major path. Without
graphs (the fake device, --no-cuda-graphs) the same static form runs eagerly: the tests compare it
with the eager path.
"""
from __future__ import annotations

import os

from .batch import is_small_batch
from .graph import INPUT

MAX_UBATCHES = 16  # a longer prompt's many (layer, ubatch) graphs would outgrow their use: eager
MAX_SIZES = 4  # ubatch sizes that get graphs (the -ub size first; a chat's many remainders run eagerly)


class LayerMajorReplay:
    def __init__(self, backend, use_graphs: bool = True):
        self.be = backend
        self.use_graphs = use_graphs and backend.graphs
        self.enabled = os.environ.get("LSTREAM_LAYER_GRAPHS") != "0"  # 0: the eager layer-major path (A/B)
        self._layouts: dict[int, tuple] = {}  # id(plan) -> (plan, layout or None)
        self._seen: dict[tuple, object] = {}  # (id(plan), n) -> plan: captured from the second time on
        self._graphs: dict[tuple, tuple] = {}  # (id(plan), n, ubatch, layer, slot, scratch gen) -> (plan, graph)
        self._inputs: dict[tuple, list] = {}  # (n, ubatch) -> [StepInputs, residual buffer or None]
        self._sizes: set[int] = set()  # ubatch sizes captured
        self._gen = None  # the backend's scratch_gen the kept graphs were captured under
        self._pool = None
        self.runs = self.captures = self.replays = 0

    # -- which prompts -----------------------------------------------------------------------------
    def layout(self, plan, graph) -> list[tuple] | None:
        """[(layer, start, stop, x_in, x_out)] for each block layer in plan order, or None when a block
        node is not on this backend, a layer's nodes are not contiguous, or more than the residual
        stream crosses a layer's bounds."""
        hit = self._layouts.get(id(plan))
        if hit is None or hit[0] is not plan:
            hit = self._layouts[id(plan)] = (plan, self._layout(plan, graph))
        return hit[1]

    def _layout(self, plan, graph):
        flat = list(plan.assignments())
        n_layer = graph.n_layer
        consumers = graph.consumers()
        spans: dict[int, list[int]] = {}
        for k, a in enumerate(flat):
            layer = a.node.layer
            if 0 <= layer < n_layer:
                if a.backend != self.be.name:
                    return None
                span = spans.setdefault(layer, [k, k])
                if span[1] != k:
                    return None  # a layer's nodes interleaved with another's
                span[1] = k + 1
        out = []
        for layer, (s, e) in spans.items():
            made = {flat[k].node.id for k in range(s, e)}
            reads = {i for k in range(s, e) for i in flat[k].node.inputs if i != INPUT and i not in made}
            live = {i for i in made if i == graph.output or any(c not in made for c in consumers[i])}
            if len(reads) != 1 or len(live) != 1:
                return None
            out.append((layer, s, e, reads.pop(), live.pop()))
        return out or None

    def eligible(self, runs) -> bool:
        be = self.be
        if not (self.enabled and getattr(be, "static_prefill", False)) or len(runs) > MAX_UBATCHES:
            return False
        bounds = None
        for ex, plan, ctx in runs:
            if ctx.logits != "last" or ctx.profile is not None or ctx.batch is not None:
                return False
            lay = self.layout(plan, ex.graph)
            if lay is None or not be.static_prefill_ok(plan):
                return False
            b = [(x[0], x[1], x[2]) for x in lay]
            if bounds is not None and b != bounds:
                return False
            bounds = b
        return True

    # -- running one ---------------------------------------------------------------------------------
    def run(self, runs):
        """The prompt's ubatches (executor, plan, context), layer by layer; the last one's logits."""
        with runs[0][0].group_session(runs):
            try:
                return self._run(runs)
            finally:
                self.be.hold_releases(False)
                for _, _, ctx in runs:
                    ctx.graph = None

    def _run(self, runs):
        be, name = self.be, self.be.name
        self.runs += 1
        n0 = runs[0][2].n_past
        total = sum(len(ctx.tokens) for _, _, ctx in runs)
        ubs = []
        for k, (ex, plan, ctx) in enumerate(runs):
            lay = self.layout(plan, ex.graph)
            vals: dict = {}
            ex.run_part(plan, ctx, vals, start=0, stop=lay[0][1])  # the embedding, eagerly
            n = len(ctx.tokens)
            buf = self._inputs.setdefault((n, k), [be.prompt_inputs(n), None])
            x0 = ex.value_on(vals[lay[0][3]], be)
            if buf[1] is None or buf[1].shape != x0.shape or buf[1].dtype != x0.dtype:
                if buf[1] is not None:
                    self._graphs.clear()  # they read and write the buffer being replaced
                buf[1] = be.clone(x0)
            else:
                be.copy_into(buf[1], x0)
            be.fill_positions(buf[0], ctx)
            seen = self._seen.get((id(plan), n)) is plan
            self._seen[(id(plan), n)] = plan
            # a size met before is captured; a one-off size (a prompt's remainder) only runs
            capture = (self.use_graphs and seen and not is_small_batch(n)
                       and (n in self._sizes or len(self._sizes) < MAX_SIZES))
            if capture:
                self._sizes.add(n)
            ubs.append((ex, plan, ctx, lay, buf[0], buf[1], capture))
        streamed = be.streamed_layers()
        be.hold_releases(True)
        for layer, s, e, x_in, x_out in ubs[0][3]:
            slot = be.acquire_layer(layer) if layer in streamed else -1
            store = ubs[0][2].kv.layers[layer]
            scratch = None if be.owns_kv(store) else be.host_kv_scratch(store, n0, n0 + total)
            for k, (ex, plan, ctx, lay, si, x, capture) in enumerate(ubs):
                si.kv.clear()
                if scratch is not None:
                    si.kv[layer] = scratch
                ctx.graph = si
                self._layer(ex, plan, ctx, x, (s, e, x_in, x_out), (id(plan), len(ctx.tokens), k, layer, slot),
                            capture)
                ctx.graph = None
            if layer in streamed:
                be.release_layer(layer)
            if scratch is not None:
                be.host_kv_done(store, scratch, n0, total)
        be.hold_releases(False)
        ex, plan, ctx, lay, _, x, _ = ubs[-1]
        return ex.run_part(plan, ctx, {lay[-1][4]: {name: x}}, start=lay[-1][2], to_host=True)

    def _layer(self, ex, plan, ctx, x, span, key, capture: bool) -> None:
        be, name = self.be, self.be.name
        s, e, x_in, x_out = span
        if be.scratch_gen != self._gen:  # a buffer graphs wrote has moved: theirs are stale
            self._graphs = {k: v for k, v in self._graphs.items() if k[-1] == be.scratch_gen}
            self._gen = be.scratch_gen
        hit = self._graphs.get(key + (be.scratch_gen,))
        if hit is not None and hit[0] is plan:
            be.replay(hit[1])
            self.replays += 1
            return

        def layer():
            vals = {x_in: {name: x}}
            ex.run_part(plan, ctx, vals, start=s, stop=e)
            be.copy_into(x, vals[x_out][name])
        layer()  # eagerly: this prompt's values (and, before a capture, its warm-up)
        if capture:
            if self._pool is None:
                self._pool = be.graph_pool()
            # (keyed after the eager run: a dequantization scratch it grew is the one the graph writes)
            self._graphs[key + (be.scratch_gen,)] = (plan, be.capture_part(layer, self._pool))
            self.captures += 1

    def clear(self) -> None:
        self._graphs.clear()
        self._layouts.clear()
        self._seen.clear()
        self._inputs.clear()
        self._sizes.clear()
        self._pool = None
