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

import numpy as np

from .batch import is_small_batch
from .graph import INPUT
from .hop_replay import HopReplay
from .ops import Op

MIN_SEGMENT = 3  # nodes: a shorter run between two host ops costs less eagerly than as a graph
MAX_PREFILL_GRAPHS = 6  # prompt ubatch graphs kept (the full -ub size and its head's plan first)


class StepReplay:
    def __init__(self, executor, backend, use_graphs: bool = True):
        self.ex, self.be = executor, backend
        self.use_graphs = use_graphs and backend.graphs
        self._graphs: dict[tuple, tuple] = {}  # key -> (plan, graph, inputs, static ins, outputs)
        self._eligible: dict[tuple, tuple] = {}  # key -> (plan, answer)
        self._seen: dict[tuple, tuple] = {}  # (plan id, prefill size) -> (plan, count)
        self.replays = self.captures = self.segment_runs = self.prefill_runs = self.host_moe_runs = 0
        self.hops = HopReplay(self)  # host-expert steps as one graph, their hops served by a mailbox

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
        return self._small(ctx) and self._whole(plan, ctx)

    def _whole(self, plan, ctx) -> bool:
        name = self.be.name
        return self._cached(("whole", id(plan)), plan, lambda: (
            all(s.backend == name for s in plan.splits)
            and not any(a.uploads for a in plan.assignments() if a.node.op is not Op.EMBED)
            and all(self.be.owns_kv(layer) for layer in ctx.kv.layers)))

    def prefill_eligible(self, plan, ctx) -> bool:
        """A prompt's ubatch held whole here (a resident model), of a size seen before: its host
        work (~15 launches per layer through Python) would outlast its GPU work, so it is captured
        once and replayed for every later ubatch of that size at any depth. A one-off size (a
        prompt's remainder) runs eagerly: a capture costs more than one eager run."""
        n = len(ctx.tokens)
        if (is_small_batch(n) or not getattr(self.be, "static_prefill", False) or ctx.logits != "last"
                or ctx.profile is not None or ctx.batch is not None or not self._whole(plan, ctx)
                or not self._cached(("static prefill", id(plan)), plan, lambda: self.be.static_prefill_ok(plan))):
            return False
        key = (id(plan), n)
        seen = self._seen.get(key)
        if seen is None or seen[0] is not plan:
            self._seen[key] = (plan, 1)
            return False
        if self.use_graphs and ("whole", id(plan), n) not in self._graphs and sum(
                1 for k in self._graphs if k[0] == "whole" and not is_small_batch(k[2])) >= MAX_PREFILL_GRAPHS:
            return False  # each graph keeps its activations' memory: a chat's many prompt sizes run eagerly
        self.prefill_runs += 1
        return True

    def segments(self, plan, ctx) -> list[tuple[int, int]]:
        """[start, stop) runs in plan order that can be replayed on their own: the runs of whole
        layers here (mixed decode: the resident layers between the CPU or streamed ones), each cut at
        a MoE op whose experts the CPU computes (--cpu-moe: the rest of every layer is here)."""
        if not self._small(ctx):
            return []
        return self._cached(("segments", id(plan)), plan, lambda: self._runs(plan, ctx))

    def _good(self, a, ctx) -> bool:
        return (a.backend == self.be.name and not a.uploads and 0 <= a.node.layer < len(ctx.kv.layers)
                and not (a.node.op is Op.ATTENTION and not self.be.owns_kv(ctx.kv.layers[a.node.layer])))

    def _runs(self, plan, ctx):
        flat = list(plan.assignments())
        # a layer is replayable when all of it is here but its experts (computed where they live)
        bad = {a.node.layer for a in flat if not self._good(a, ctx) and a.node.op is not Op.MOE}
        runs: list[list[int]] = []
        for k, a in enumerate(flat):
            if a.node.layer in bad or not self._good(a, ctx):
                continue
            if runs and runs[-1][1] == k:
                runs[-1][1] = k + 1
            else:
                runs.append([k, k + 1])
        reads = []
        for s, e in runs:  # what each run reads from before it: its static inputs
            made = {flat[k].node.id for k in range(s, e)}
            reads.append(sorted({i for k in range(s, e) for i in flat[k].node.inputs
                                 if i != INPUT and i not in made}))
        return [(s, e, r) for (s, e), r in zip(runs, reads) if e - s >= MIN_SEGMENT]

    # -- running them ----------------------------------------------------------------------------
    def run(self, plan, ctx, ex=None, to_host: bool = True):
        """The whole step: logits as float32 numpy, (vocab,) rows like Executor.run returns them
        (None with to_host=False: a prompt's earlier ubatch, run by the body's executor `ex`)."""
        ex = ex or self.ex
        n = len(ctx.tokens)
        if not self.use_graphs:
            ctx.graph = self.be.step_inputs(n)
            self.be.fill_step_inputs(ctx.graph, ctx)
            out = ex.run(plan, ctx, to_host=False)
            return self._logits(out, ex) if to_host else None
        key = ("whole", id(plan), n)
        hit = self._graphs.get(key)
        if hit is None or hit[0] is not plan:
            si = self.be.step_inputs(n)
            self.be.fill_step_inputs(si, ctx)
            ctx.graph = si
            # a decode step's output is read after every replay: its inputs and output may be staged
            graph, out = self.be.capture(lambda: ex.run(plan, ctx, to_host=False), si,
                                         whole=is_small_batch(n) and to_host)
            self.captures += 1
            hit = self._graphs[key] = (plan, graph, si, None, out)
        _, graph, si, _, out = hit
        self.be.fill_step_inputs(si, ctx)
        self.be.replay(graph)
        self.replays += 1
        if not to_host and getattr(si, "staged", None) is not None:
            self.be.synchronize()  # the staged mirrors are rewritten by the next fill
        return self._logits(out, ex, si) if to_host else None

    def _logits(self, value, ex=None, si=None):
        ex = ex or self.ex
        staged = getattr(self.be, "staged_output", None)
        logits = staged(si, value) if staged is not None and si is not None else None
        if logits is None:
            logits = self.be.to_host(value)
        ex.check_finite(logits, ex.graph.output, self.be.name)
        return logits

    def run_segments(self, plan, ctx, segs):
        """The plan with its segments replayed from graphs whose static inputs are the values that
        cross into them (the residual stream, an expert op's output), the rest run eagerly. The
        segments of a step share its static inputs (token ids, positions), filled once."""
        if hops := self.hops.hops(plan, ctx):
            out = self.hops.run(plan, ctx, hops)
            if out is not None:
                return out
        ex, be, name = self.ex, self.be, self.be.name
        n = len(ctx.tokens)
        self.segment_runs += 1
        with ex.session(plan, ctx):
            vals: dict = {}
            if self.use_graphs:
                key = ("step", id(plan), n)
                hit = self._graphs.get(key)
                if hit is None or hit[0] is not plan:
                    hit = self._graphs[key] = (plan, be.step_inputs(n))
                si = hit[1]
            else:
                si = be.step_inputs(n)
            be.fill_step_inputs(si, ctx)
            pos = 0
            for start, stop, reads in segs:
                pos += self._host_moe(plan, vals, pos)
                if pos < start:
                    ex.run_part(plan, ctx, vals, start=pos, stop=start)
                live = {i: ex.value_on(vals[i], be) for i in reads if i in vals}
                ctx.graph = si
                if not self.use_graphs:
                    part = {i: {name: v} for i, v in live.items()}
                    ex.run_part(plan, ctx, part, start=start, stop=stop)
                    outs = {i: where[name] for i, where in part.items()}
                else:
                    key = ("segment", id(plan), n, start)
                    hit = self._graphs.get(key)
                    if hit is None or hit[0] is not plan:
                        hit = self._graphs[key] = self._capture_segment(plan, ctx, si, (start, stop), live)
                    _, graph, static, outs = hit
                    for i, v in live.items():
                        if static[i] is not v:  # (an earlier segment's output is read in place)
                            be.copy_into(static[i], v)
                    be.replay(graph)
                    self.replays += 1
                ctx.graph = None
                for i in live:
                    vals.pop(i, None)  # read inside: what is still needed comes back in outs
                vals.update({i: {name: v} for i, v in outs.items()})
                pos = stop
            pos += self._host_moe(plan, vals, pos)  # the last layer's experts, before the head
            return ex.run_part(plan, ctx, vals, start=pos, to_host=True)

    def _host_moe(self, plan, vals, k: int) -> int:
        """Assignment k when it is a MoE op whose experts the host computes, its inputs made on this
        backend (--cpu-moe: what follows a segment): x and the router's logits read back with one wait,
        routed and computed by the host backend, its output sent up without a wait. Returns how many
        assignments it ran (0: not such an op, the executor runs it)."""
        flat = self._cached(("flat", id(plan)), plan, lambda: list(plan.assignments()))
        if k >= len(flat):
            return 0
        a = flat[k]
        host = self.ex.backends[a.backend]
        name = self.be.name
        if (a.node.op is not Op.MOE or a.backend == name or len(a.node.inputs) != 2
                or not hasattr(host, "moe_route") or not hasattr(self.be, "read_back")
                or not all(i in vals and name in vals[i] for i in a.node.inputs)):
            return 0
        node = a.node
        xs = self.be.read_back([vals[i][name] for i in node.inputs])
        for i, h in zip(node.inputs, xs):
            self.ex.check_finite(h, i, name)
        ids, w = host.moe_route(node, xs[1])
        # --moe-share: the device computes some routed experts (copied from pinned memory) meanwhile
        share = getattr(self.be, "share_experts", None)
        take, y_dev = share(node, vals[node.inputs[0]][name], ids, w) if share is not None else (None, None)
        up = self.be.send_up(host.moe_experts(node, xs[0], ids if take is None else np.where(take, -1, ids), w))
        vals[node.id] = {name: up if y_dev is None else up.add_(y_dev)}
        self.host_moe_runs += 1
        return 1

    def _capture_segment(self, plan, ctx, si, seg, live):
        be = self.be
        made = {id(v) for k, hit in self._graphs.items() if k[0] == "segment" and hit[0] is plan
                for v in hit[3].values()}
        static = {i: v if id(v) in made else be.clone(v) for i, v in live.items()}

        def segment():
            vals = {i: {be.name: v} for i, v in static.items()}
            self.ex.run_part(plan, ctx, vals, start=seg[0], stop=seg[1])
            return {i: where[be.name] for i, where in vals.items()}
        graph, outs = be.capture(segment, si)
        self.captures += 1
        return plan, graph, static, outs

    def clear(self) -> None:
        self.hops.clear()
        self._graphs.clear()
        self._eligible.clear()
        self._seen.clear()
