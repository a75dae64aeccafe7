"""Decode steps replayed from captured device graphs: a run strategy chosen by core/runner.py.

A backend that declares `static_steps` runs a small step from static inputs (token ids, positions
and the K/V span in fixed device buffers, refilled before each step); one that also declares
`graphs` captures such a step once per (plan, tokens) and replays it, so a token costs one
launch instead of a few hundred. This module decides when that applies (the whole plan on that
backend, or the longest run of whole layers there: mixed decode) and drives the executor inside
the capture; the backend only provides the inputs, the capture and the replay. With graphs off the
same static step runs eagerly: the two give identical outputs, which the GPU tests compare.
"""
from __future__ import annotations

from .batch import is_small_batch
from .ops import Op


class StepReplay:
    def __init__(self, executor, backend, use_graphs: bool = True):
        self.ex, self.be = executor, backend
        self.use_graphs = use_graphs and backend.graphs
        self._graphs: dict[tuple, tuple] = {}  # key -> (plan, graph, inputs, static ins, outputs)
        self._eligible: dict[tuple, tuple] = {}  # key -> (plan, answer)
        self.replays = self.captures = self.segment_runs = 0

    # -- which plans -----------------------------------------------------------------------------
    def _small(self, ctx) -> bool:
        return is_small_batch(len(ctx.tokens)) and ctx.logits == "last" and ctx.profile is None

    def _cached(self, key, plan, compute):
        hit = self._eligible.get(key)
        if hit is None or hit[0] is not plan:
            hit = self._eligible[key] = (plan, compute())
        return hit[1]

    def eligible(self, plan, ctx) -> bool:
        """Every node on this backend, nothing streamed but the token rows, every K/V here."""
        if not self._small(ctx):
            return False
        name = self.be.name
        return self._cached(("whole", id(plan)), plan, lambda: (
            all(s.backend == name for s in plan.splits)
            and not any(a.uploads for a in plan.assignments() if a.node.op is not Op.EMBED)
            and all(self.be.owns_kv(layer) for layer in ctx.kv.layers)))

    def segment(self, plan, ctx) -> tuple[int, int] | None:
        """[start, stop) in plan order: the longest run of whole layers that can be replayed on
        their own (mixed decode: the resident layers between the CPU or streamed ones), or None."""
        if not self._small(ctx):
            return None
        return self._cached(("segment", id(plan)), plan, lambda: self._longest_run(plan, ctx))

    def _longest_run(self, plan, ctx):
        flat = list(plan.assignments())
        bad = {a.node.layer for a in flat if not (
            a.backend == self.be.name and not a.uploads
            and not (a.node.op is Op.ATTENTION and not self.be.owns_kv(ctx.kv.layers[a.node.layer])))}
        best, run = None, None  # runs of consecutive good layers, as [first index, end index)
        for k, a in enumerate(flat):
            good = a.node.layer not in bad and 0 <= a.node.layer < len(ctx.kv.layers)
            if not good:
                run = None
                continue
            if run is None:
                run = [k, k]
            run[1] = k + 1
            if best is None or run[1] - run[0] > best[1] - best[0]:
                best = tuple(run)
        return best

    # -- running them ----------------------------------------------------------------------------
    def run(self, plan, ctx):
        """The whole step: logits as float32 numpy, (vocab,) rows like Executor.run returns them."""
        n = len(ctx.tokens)
        if not self.use_graphs:
            ctx.graph = self.be.step_inputs(n)
            self.be.fill_step_inputs(ctx.graph, ctx)
            return self._logits(self.ex.run(plan, ctx, to_host=False))
        key = ("whole", id(plan), n)
        hit = self._graphs.get(key)
        if hit is None or hit[0] is not plan:
            si = self.be.step_inputs(n)
            self.be.fill_step_inputs(si, ctx)
            ctx.graph = si
            graph, out = self.be.capture(lambda: self.ex.run(plan, ctx, to_host=False), si)
            self.captures += 1
            hit = self._graphs[key] = (plan, graph, si, None, out)
        _, graph, si, _, out = hit
        self.be.fill_step_inputs(si, ctx)
        self.be.replay(graph)
        self.replays += 1
        return self._logits(out)

    def _logits(self, value):
        logits = self.be.to_host(value)
        self.ex.check_finite(logits, self.ex.graph.output, self.be.name)
        return logits

    def run_segment(self, plan, ctx, seg: tuple[int, int]):
        """The plan before the segment eagerly, the segment replayed from a graph whose static
        inputs are the values that cross into it (the residual stream), the rest eagerly."""
        start, stop = seg
        ex, be, name = self.ex, self.be, self.be.name
        self.segment_runs += 1
        with ex.session(plan, ctx):
            vals: dict = {}
            ex.run_part(plan, ctx, vals, stop=start)
            live = {i: ex.value_on(where, be) for i, where in vals.items()}  # what the segment reads
            n = len(ctx.tokens)
            if not self.use_graphs:
                ctx.graph = be.step_inputs(n)
                be.fill_step_inputs(ctx.graph, ctx)
                after = {i: {name: v} for i, v in live.items()}
                ex.run_part(plan, ctx, after, start=start, stop=stop)
            else:
                key = ("segment", id(plan), n)
                hit = self._graphs.get(key)
                if hit is None or hit[0] is not plan:
                    hit = self._graphs[key] = self._capture_segment(plan, ctx, n, seg, live)
                _, graph, si, static, outs = hit
                for i, v in live.items():
                    be.copy_into(static[i], v)
                be.fill_step_inputs(si, ctx)
                be.replay(graph)
                self.replays += 1
                after = {i: {name: v} for i, v in outs.items()}
            ctx.graph = None
            return ex.run_part(plan, ctx, after, start=stop, to_host=True)

    def _capture_segment(self, plan, ctx, n, seg, live):
        be = self.be
        static = {i: be.clone(v) for i, v in live.items()}
        si = be.step_inputs(n)
        be.fill_step_inputs(si, ctx)
        ctx.graph = si

        def segment():
            vals = {i: {be.name: v} for i, v in static.items()}
            self.ex.run_part(plan, ctx, vals, start=seg[0], stop=seg[1])
            return {i: where[be.name] for i, where in vals.items()}
        graph, outs = be.capture(segment, si)
        self.captures += 1
        return plan, graph, si, static, outs

    def clear(self) -> None:
        self._graphs.clear()
        self._eligible.clear()
