"""Decode steps of the device-resident part as CUDA graphs: captured once per (batch, K/V span),
then replayed, so a token costs one launch instead of a few hundred Python-issued kernels.

A step runs in "static" mode (RunContext.graph is a StepInputs): token rows, positions and the K/V
span live in fixed device buffers that are refilled before each replay; attention reads the first
`span` cache rows under a position mask, so one graph serves every n_past inside its span. With
graphs disabled (`cuda_graphs=False`) the same static step runs eagerly: the two give identical
outputs, which is what the test compares.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SPAN_STEP = 256  # K/V rows per span bucket: a graph per 256 tokens of context, at most


@dataclass
class StepInputs:
    tokens: torch.Tensor  # (B,) int64 on the device
    positions: torch.Tensor  # (B,) int64 on the device
    rows: torch.Tensor | None  # (B, row_bytes) uint8: the token_embd rows when it lives on the host
    span: int  # cache rows attention reads (a multiple of SPAN_STEP, or n_ctx)
    cache: dict = field(default_factory=dict)  # per-step values shared by the layers (rope cos/sin, mask)


class StepRunner:
    def __init__(self, backend, max_tokens: int = 8, use_graphs: bool = True):
        self.backend = backend
        self.max_tokens = max_tokens
        self.use_graphs = use_graphs
        self._graphs: dict[tuple, tuple] = {}  # (plan id, B, span) -> (plan, graph, inputs, output)
        self._eligible: dict[int, tuple] = {}
        self.replays = self.captures = self.segment_runs = 0

    def segment(self, plan, ctx) -> tuple[int, int] | None:
        """[start, stop) in plan order: the longest run of whole layers that could be replayed on
        their own (mixed decode: the resident layers between the CPU or streamed ones and a
        streamed output head), or None."""
        if len(ctx.tokens) > self.max_tokens or ctx.logits != "last" or ctx.profile is not None:
            return None
        key = ("segment", id(plan))
        hit = self._eligible.get(key)
        if hit is None or hit[0] is not plan:
            from ..core.ops import Op
            from .cuda import DeviceKV
            flat = list(plan.assignments())
            bad_layers = {a.node.layer for a in flat if not (
                a.backend == self.backend.name and not a.uploads and not (
                    a.node.op is Op.ATTENTION and not isinstance(ctx.kv.layers[a.node.layer], DeviceKV)))}
            best, run = None, None  # runs of consecutive good layers, as [first index, end index)
            for k, a in enumerate(flat):
                good = a.node.layer not in bad_layers and 0 <= a.node.layer < len(ctx.kv.layers)
                if good and (run is None or run[1] != k):
                    run = [k, k]
                if good:
                    run[1] = k + 1
                    if best is None or run[1] - run[0] > best[1] - best[0]:
                        best = tuple(run)
                elif run is not None:
                    run = None
            hit = self._eligible[key] = (plan, best if best and best[1] - best[0] > 0 else None)
        return hit[1]

    def run_segment(self, executor, plan, ctx, seg: tuple[int, int]) -> np.ndarray:
        """The plan before the segment eagerly, the segment replayed from a graph whose static
        inputs are the values that cross into it (the residual stream), the rest eagerly."""
        start, stop = seg
        name, be = self.backend.name, self.backend
        self.segment_runs += 1
        used = executor._used(plan)
        for b in used:
            b.begin_run(plan, ctx)
        try:
            vals: dict = {}
            for _ in executor.steps(plan, ctx, [], values=vals, stop=start):
                pass
            live = {}
            for i, where in vals.items():  # what the segment reads, on the device
                if name in where:
                    live[i] = where[name]
                else:
                    src, v = next(iter(where.items()))
                    live[i] = be.from_host(executor.backends[src].to_host(v))
            n = len(ctx.tokens)
            span = min(ctx.kv.n_ctx, -(-(ctx.n_past + n) // SPAN_STEP) * SPAN_STEP)
            if not self.use_graphs:
                ctx.graph = self._inputs(n, span, None)
                self._fill(ctx.graph, ctx)
                after = {i: {name: v} for i, v in live.items()}
                for _ in executor.steps(plan, ctx, [], values=after, start=start, stop=stop):
                    pass
            else:
                key = ("segment", id(plan), n, span)
                hit = self._graphs.get(key)
                if hit is None or hit[0] is not plan:
                    hit = self._graphs[key] = self._capture_segment(executor, plan, ctx, n, span, seg, live)
                _, graph, si, static, outs = hit
                for i, v in live.items():
                    static[i].copy_(v)
                self._fill(si, ctx)
                graph.replay()
                self.replays += 1
                after = {i: {name: v} for i, v in outs.items()}
            ctx.graph = None
            out: list = []
            for _ in executor.steps(plan, ctx, out, values=after, start=stop):
                pass
            return out[0]
        finally:
            for b in used:
                b.end_run()

    def _capture_segment(self, executor, plan, ctx, n, span, seg, live):
        static = {i: v.clone() for i, v in live.items()}
        si = self._inputs(n, span, None)
        self._fill(si, ctx)
        ctx.graph = si

        def segment():
            vals = {i: {self.backend.name: v} for i, v in static.items()}
            for _ in executor.steps(plan, ctx, [], values=vals, start=seg[0], stop=seg[1]):
                pass
            return {i: where[self.backend.name] for i, where in vals.items()}
        dev = self.backend.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            segment()
        torch.cuda.current_stream(dev).wait_stream(side)
        si.cache.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = segment()
        self.captures += 1
        return plan, graph, si, static, outs

    def eligible(self, plan, ctx) -> bool:
        """Every node on this backend, nothing streamed, every layer's K/V in VRAM, few tokens."""
        if len(ctx.tokens) > self.max_tokens or ctx.logits != "last" or ctx.profile is not None:
            return False
        hit = self._eligible.get(id(plan))
        if hit is None or hit[0] is not plan:
            from ..core.ops import Op
            from .cuda import DeviceKV
            ok = (all(s.backend == self.backend.name for s in plan.splits)  # the embedding's rows: see _fill
                  and not any(a.uploads for a in plan.assignments() if a.node.op is not Op.EMBED)
                  and all(isinstance(layer, DeviceKV) for layer in ctx.kv.layers))
            hit = self._eligible[id(plan)] = (plan, ok)
        return hit[1]

    def _inputs(self, n: int, span: int, row_bytes: int | None) -> StepInputs:
        dev = self.backend.device
        rows = torch.zeros((n, row_bytes), dtype=torch.uint8, device=dev) if row_bytes else None
        return StepInputs(torch.zeros(n, dtype=torch.int64, device=dev), torch.zeros(n, dtype=torch.int64, device=dev),
                          rows, span)

    def _fill(self, si: StepInputs, ctx) -> None:
        toks = np.asarray(ctx.tokens, dtype=np.int64)
        si.tokens.copy_(torch.from_numpy(toks))
        si.positions.copy_(torch.from_numpy(np.asarray(ctx.positions, dtype=np.int64)))
        if si.rows is not None:
            e = self.backend.residency["token_embd.weight"]
            host = np.ascontiguousarray(e.data).reshape(e.n_rows, -1).view(np.uint8)
            si.rows.copy_(torch.from_numpy(host[toks]))

    def run(self, executor, plan, ctx) -> np.ndarray:
        """The step's logits as float32 numpy, (vocab,) rows like Executor.run returns them."""
        n = len(ctx.tokens)
        n_ctx = ctx.kv.n_ctx
        span = min(n_ctx, -(-(ctx.n_past + n) // SPAN_STEP) * SPAN_STEP)
        emb = self.backend.residency["token_embd.weight"] if "token_embd.weight" in self.backend.residency else None
        row_bytes = None
        if emb is not None and "token_embd.weight" not in self.backend._resident:
            row_bytes = emb.nbytes // emb.n_rows
        if not self.use_graphs:
            si = self._inputs(n, span, row_bytes)
            self._fill(si, ctx)
            ctx.graph = si
            return self.backend.to_host(executor.run(plan, ctx, to_host=False))
        key = (id(plan), n, span)
        hit = self._graphs.get(key)
        if hit is None or hit[0] is not plan:
            hit = self._graphs[key] = self._capture(executor, plan, ctx, n, span, row_bytes)
        _, graph, si, out = hit
        self._fill(si, ctx)
        graph.replay()
        self.replays += 1
        return self.backend.to_host(out)

    def _capture(self, executor, plan, ctx, n, span, row_bytes):
        """Warm up (Triton compiles, cuBLAS workspaces, scratch buffers) on a side stream with the
        real inputs, then capture. The warm-up writes the step's own K/V rows, which the replay
        right after writes again with the same values."""
        si = self._inputs(n, span, row_bytes)
        self._fill(si, ctx)
        ctx.graph = si
        side = torch.cuda.Stream(self.backend.device)
        side.wait_stream(torch.cuda.current_stream(self.backend.device))
        with torch.cuda.stream(side):
            executor.run(plan, ctx, to_host=False)
        torch.cuda.current_stream(self.backend.device).wait_stream(side)
        si.cache.clear()  # the capture must record how the shared per-step values are made
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = executor.run(plan, ctx, to_host=False)
        self.captures += 1
        return plan, graph, si, out

    def clear(self) -> None:
        self._graphs.clear()
        self._eligible.clear()
