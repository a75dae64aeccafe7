"""Runs one evaluation's ubatches, choosing the strategy from what the backends declare:

  layer-major   a prompt of several ubatches whose layers stream: every ubatch passes layer L before
                any passes L+1, so a streamed layer crosses PCIe once per prompt, not per ubatch;
                in static form with each (layer, ubatch) replayed from a graph where the backend
                allows (core/layer_replay.py);
  graph step    a decode-sized step that a `static_steps` backend holds whole: static inputs,
                replayed from a captured graph where the backend declares `graphs` (core/replay.py);
                also a prompt's ubatch there, of a size seen before (`static_prefill` backends);
  graph segments a decode-sized step with runs of whole layers on such a backend (mixed decode),
                cut at the MoE ops whose experts the CPU computes;
  plain         one ubatch after another, node by node (core/executor.py).
"""
from __future__ import annotations

import numpy as np

from .executor import Executor, RunContext
from .layer_replay import LayerMajorReplay
from .ops import Op
from .replay import StepReplay
from .scheduler import Plan


class Runner:
    def __init__(self, executor: Executor, body: Executor, backends: list, layer_major: bool = True,
                 graphs: bool = True):
        self.executor, self.body = executor, body
        self.layer_major = layer_major
        self.replay = next((StepReplay(executor, b, graphs) for b in backends if b.static_steps), None)
        self.layer_replay = next((LayerMajorReplay(b, graphs) for b in backends if b.static_steps), None)

    def run(self, runs: list[tuple[Executor, Plan, RunContext]], all_logits: bool) -> np.ndarray:
        """runs: (executor, plan, context) per ubatch, in order; returns the last token's logits
        (vocab,), or every token's (n_tokens, vocab) with all_logits."""
        if not all_logits and self._use_layer_major(runs):
            if self.layer_replay is not None and self.layer_replay.eligible(runs):
                out = self.layer_replay.run(runs)[-1]
            else:
                out = run_layer_major(runs)[-1]
            _advance(runs[-1][2])
            return out
        if len(runs) == 1 and self.replay is not None:
            _, plan, ctx = runs[0]
            out = None
            if self.replay.eligible(plan, ctx):
                out = self.replay.run(plan, ctx)[-1]
            elif segs := self.replay.segments(plan, ctx):
                out = self.replay.run_segments(plan, ctx, segs)[-1]
            if out is not None:
                _advance(ctx)
                return out
        outs = []
        for k, (ex, plan, ctx) in enumerate(runs):
            last = k == len(runs) - 1
            if not all_logits and self.replay is not None and self.replay.prefill_eligible(plan, ctx):
                out = self.replay.run(plan, ctx, ex, to_host=last)
            else:
                out = ex.run(plan, ctx, to_host=True if (all_logits or last) else None)
            _advance(ctx)  # a later failure keeps the ubatches that finished
            if all_logits:
                outs.append(out)
            elif last:
                outs.append(out[-1])
        return np.concatenate(outs, axis=0) if all_logits else outs[-1]

    def locate_nonfinite(self, runs) -> None:
        """Run the ubatches again op by op, each node's value checked: raises NonFiniteError naming
        the node where a NaN or inf first appears (the caller rewinds the cache first; the same
        positions are written again)."""
        for ex, plan, ctx in runs:
            ctx.graph = None
            ex.run(plan, ctx, to_host=None, check=True)

    def _use_layer_major(self, runs) -> bool:
        """Layer by layer when that saves weight traffic: some layer is streamed to the device, and
        every ubatch places every block node the same way (so K/V a device wrote back are never
        read by the CPU within the prompt)."""
        if not self.layer_major or len(runs) < 2:
            return False
        plans = [p for _, p, _ in runs]
        # (the token rows an EMBED gathers from the host are not a layer's stream)
        if not any(a.uploads for a in plans[0].assignments() if a.node.op is not Op.EMBED):
            return False
        n_body = len(self.body.graph.nodes)
        first = plans[0].signature()[:n_body]
        return all(p.signature()[:n_body] == first for p in plans[1:])

    def clear(self) -> None:
        if self.replay is not None:
            self.replay.clear()
        if self.layer_replay is not None:
            self.layer_replay.clear()


def _advance(ctx: RunContext) -> None:
    ctx.kv.n_past = ctx.n_past + len(ctx.tokens)


def run_layer_major(runs: list[tuple[Executor, Plan, RunContext]]) -> np.ndarray:
    """Run the ubatches of one prompt layer by layer: every ubatch passes layer L before any passes
    L+1. Same results as one ubatch after another (ubatch k's attention at layer L reads the K/V
    that ubatches < k wrote there just before). Returns the last run's output (the earlier ones
    have no head)."""
    with runs[0][0].group_session(runs):
        out: list = []  # only the last run has a head: the others append None first
        # fuse=False: a compiled run spans layers, and ubatch k must not pass layer L before k-1 has
        gens = [ex.steps(plan, ctx, out if k == len(runs) - 1 else [], to_host=True if k == len(runs) - 1 else None,
                         fuse=False)
                for k, (ex, plan, ctx) in enumerate(runs)]
        nxt = [next(g, None) for g in gens]
        while any(n is not None for n in nxt):
            cur = min(n for n in nxt if n is not None)
            for k, g in enumerate(gens):
                while nxt[k] is not None and nxt[k] <= cur:
                    nxt[k] = next(g, None)
        return out[-1]
