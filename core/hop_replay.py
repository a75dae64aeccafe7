"""A decode step whose MoE experts the host computes (--cpu-moe, --n-cpu-moe), replayed as ONE graph
with its expert hops served through a mailbox (core/hop_mailbox.py): a strategy of core/replay.py.

The segment path (StepReplay.run_segments) replays a graph per run of layers and, between two, reads
x and the router's logits back, waits, computes the experts and sends the answer up: about 0.45 ms of
host work a layer (launches, copies, waits, Python) beside 0.4 ms of expert compute (tools/gpu_notes.md).
Here the device routes each hop, posts x with the expert ids and weights into pinned memory and raises
a flag, then waits in the stream for the host's answering flag; the host only spins, computes and
answers. The step's launches, copies
and waits are all inside the graph.

Used when every op but the host experts runs on the graphs backend and the backend offers a mailbox
(LSTREAM_HOP_GRAPHS=0: the segment path, to compare). The eager warm-up before the capture is the
segment path's walk with its read-back hops: the same values.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from .ops import Op

HOP_GRAPHS = os.environ.get("LSTREAM_HOP_GRAPHS") != "0"


class HopReplay:
    def __init__(self, replay):
        self.r = replay  # the StepReplay: its executor, backend, caches and counters
        # (id(plan), n, --moe-share) -> (plan, graph, inputs, mailbox, share, output)
        self._steps: dict[tuple, tuple] = {}
        self.runs = self.served = 0

    def hops(self, plan, ctx) -> list | None:
        """[(plan index, node, host backend)] of the host-expert MoE ops when everything else runs on
        the graphs backend, else None."""
        return self.r._cached(("hops", id(plan)), plan, lambda: self._hops(plan, ctx))

    def _hops(self, plan, ctx):
        r, be = self.r, self.r.be
        if not (HOP_GRAPHS and r.use_graphs and hasattr(be, "hop_mailbox")):
            return None
        out = []
        for k, a in enumerate(plan.assignments()):
            node = a.node
            if node.op is Op.MOE and a.backend != be.name:
                host = r.ex.backends[a.backend]
                if not hasattr(host, "moe_hop"):
                    return None
                out.append((k, node, host))
            elif (a.backend != be.name or (a.uploads and node.op is not Op.EMBED)
                  or (node.op is Op.ATTENTION and not be.owns_kv(ctx.kv.layers[node.layer]))):
                return None
        return out or None

    def run(self, plan, ctx, hops):
        """The step's logits as float32 numpy (vocab,) rows, or None when its graph could not be made
        (the caller runs the segment path)."""
        key = (id(plan), len(ctx.tokens), getattr(self.r.be, "moe_share", 0))
        hit = self._steps.get(key)
        if hit is None or hit[0] is not plan:
            hit = self._steps[key] = self._capture(plan, ctx, hops)
        _, graph, si, box, share, out = hit
        if graph is None:
            return None
        r, ex, be = self.r, self.r.ex, self.r.be
        self.runs += 1
        be.fill_step_inputs(si, ctx)
        box.reset()
        be.replay(graph)
        r.replays += 1
        self._serve(plan, ctx, hops, box, share)
        return r._logits(out, ex, si)

    def _serve(self, plan, ctx, hops, box, share) -> None:
        """The hops in order, while the graph runs: wait for the posted values (x and the device's
        routing, or x, the router's logits and a shared expert's output), compute, answer."""
        ex, name = self.r.ex, self.r.be.name
        hosts = list({id(h): h for _, _, h in hops}.values())
        try:
            for h in hosts:  # (only the host backends: the device's session was the capture's)
                h.begin_run(plan, ctx)
            try:
                for j, (_, node, host) in enumerate(hops):
                    xs = box.wait_posted(j)
                    if len(xs) > len(node.inputs):  # routed on the device: x, ids, weights
                        x, ids, w = xs[0], xs[1].astype(np.int32), xs[2]  # (ids < 2^24: exact in float32)
                        ex.check_finite(x, node.inputs[0], name)
                        ex.check_finite(w, node.inputs[1], name)  # (non-finite logits make NaN weights)
                        take = share.issue(j, ids, w) if share is not None else None  # (the device's part)
                        box.answer(j, host.moe_experts(node, x, ids if take is None else np.where(take, -1, ids), w))
                    else:
                        for i, h in zip(node.inputs, xs):
                            ex.check_finite(h, i, name)
                        box.answer(j, host.moe_hop(node, xs))
                    self.served += 1
            finally:
                for h in hosts:
                    h.end_run()
        except BaseException:
            box.release()  # the graph runs to its end; its output is not read
            self.r.be.synchronize()
            raise

    def _walk(self, plan, ctx, hops, hop):
        """The step in plan order (inside a session), each host-expert op done by hop(j, k, vals);
        returns the device output."""
        ex = self.r.ex
        vals: dict = {}
        pos = 0
        for j, (k, _, _) in enumerate(hops):
            if pos < k:
                ex.run_part(plan, ctx, vals, start=pos, stop=k)
            hop(j, k, vals)
            pos = k + 1
        return ex.run_part(plan, ctx, vals, start=pos, to_host=False)

    def _capture(self, plan, ctx, hops):
        r, ex, be, name = self.r, self.r.ex, self.r.be, self.r.be.name
        si = be.step_inputs(len(ctx.tokens))
        be.fill_step_inputs(si, ctx)
        box = be.hop_mailbox(len(hops))
        share = be.hop_share(box) if getattr(be, "moe_share", 0) else None

        def routed(node, xs):  # the device's routing of a hop's token(s), or None (a shared expert)
            return be.hop_route(node, xs[1]) if len(xs) == 2 and hasattr(be, "hop_route") else None

        def boxed(j, k, vals):
            node = hops[j][1]
            xs = [vals[i][name] for i in node.inputs]
            rw = routed(node, xs)
            box.post(j, xs if rw is None else [xs[0], *rw])
            ys = share.device(j, node, xs[0], *rw) if share is not None and rw is not None else None
            y = box.take(j)
            vals[node.id] = {name: y if ys is None else y + ys}

        def warm(j, k, vals):  # the segment path's hop, and the device's routing and share compiled
            node = hops[j][1]
            xs = [vals[i][name] for i in node.inputs]
            rw = routed(node, xs)
            if share is not None and rw is not None:
                share.warm(node, xs[0], *rw)
            return r._host_moe(plan, vals, k) or ex.run_part(plan, ctx, vals, start=k, stop=k + 1)
        ctx.graph = si
        try:
            # warm-up (kernels compiled, scratch grown) with read-back hops: a mailbox hop needs the
            # host to answer while the device runs, which an eager run issuing every launch first cannot
            with ex.session(plan, ctx):
                self._walk(plan, ctx, hops, warm)
            try:
                with ex.session(plan, ctx):  # (around the capture: a replay is the walk alone)
                    graph, out = be.capture(lambda: self._walk(plan, ctx, hops, boxed), si, whole=True,
                                            warm=False)
            except RuntimeError as e:  # (a driver without stream memory operations in graphs)
                warnings.warn(f"expert hops in one graph unavailable ({e}); replaying segments instead")
                return plan, None, None, None, None, None
        finally:
            ctx.graph = None
        r.captures += 1
        return plan, graph, si, box, share, out

    def clear(self) -> None:
        self._steps.clear()
