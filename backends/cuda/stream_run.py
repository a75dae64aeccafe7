"""The streaming side of the CUDA backend's runs: which streamed layers a plan (or a layer-major
group of ubatches) needs, acquiring them from the ring as nodes read them and releasing them after
their last read, host K/V write-backs, and the copy statistics. A mixin of CUDABackend."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.graph import Node
from ...core.streaming import LayerStreamer


@dataclass
class _RunState:
    release_at: dict  # (ubatch, node id) -> streamed layers released after that node
    layer_of: dict  # streamed tensor -> layer
    views: dict  # streamed tensor -> its device bytes in the ring, for this run
    ctx: object  # the last ubatch's context (its profile gets the copy statistics)


class StreamRunMixin:
    def _ensure_streamer(self) -> LayerStreamer:
        if self.streamer is None:
            self.streamer = LayerStreamer(self.rt, self.residency, self._streamable, self.ring_slots)
        return self.streamer

    # -- a run ---------------------------------------------------------------------------------
    def _stream_plan(self, plan):
        """(layer order, {node id: layers released after it}, {tensor: layer}) for this plan."""
        key = id(plan)
        cached = self._plan_cache.get(key)
        if cached is not None and cached[0] is plan:
            return cached[1]
        streamed = set(self._streamable)
        order, last, layer_of = [], {}, {}
        for a in plan.assignments():
            if a.backend != self.name:
                continue
            for w in a.uploads:
                if w in streamed:
                    layer = self.residency[w].layer
                    layer_of[w] = layer
                    if layer not in order:
                        order.append(layer)
                    last[layer] = a.node.id
        release_after: dict[int, list[int]] = {}
        for layer, nid in last.items():
            release_after.setdefault(nid, []).append(layer)
        info = (order, release_after, layer_of)
        self._plan_cache[key] = (plan, info)
        return info

    def begin_run(self, plan, ctx) -> None:
        self.begin_group([(plan, ctx)])

    def begin_group(self, runs) -> None:
        """One ubatch, or several run layer by layer: a streamed layer is acquired by the first
        ubatch that reads it and released after the last one has enqueued its last read."""
        order: list[int] = []
        layer_of: dict[str, int] = {}
        last_user: dict[int, tuple[int, int]] = {}  # layer -> (ubatch, node id) of its last read
        for k, (plan, ctx) in enumerate(runs):
            o, release_after, lo = self._stream_plan(plan)
            order += [layer for layer in o if layer not in last_user]
            layer_of.update(lo)
            for nid, layers in release_after.items():
                for layer in layers:
                    last_user[layer] = (k, nid)
        if len(runs) > 1:
            order.sort()  # layer-major: the first ubatch meets the layers in layer order
        release_at: dict[tuple[int, int], list[int]] = {}
        for layer, at in last_user.items():
            release_at.setdefault(at, []).append(layer)
        if order:
            st = self._ensure_streamer()
            st.speculate = self._speculate_now(runs[-1][1])
            # The ring keeps its few slots also in decode: grown to every streamed layer it would keep
            # them across steps (a slot still holding its layer is not copied again), i.e. use VRAM
            # beyond what -ngl leaves for weights and stop streaming: not what a model that does not
            # fit can do. A split decode step issues its copies as slots free, one layer ahead.
            st.begin(order)
        self._run = _RunState(release_at, layer_of, {}, runs[-1][1])
        self._pend.clear()

    def _speculate_now(self, ctx) -> bool:
        """Prefetch the first layers again at the end of this run? Only when allowed (`speculate`)
        and worth it: another ubatch of the same prompt follows (ctx.more_ubatches; unknown: yes)."""
        return self.speculate and bool(ctx.more_ubatches)

    def end_group(self) -> None:
        self.end_run()

    def end_run(self) -> None:
        run, self._run = self._run, None
        s = self.streamer
        before = (s.stats.bytes_streamed, s.stats.copy_ms, s.stats.stall_ms) if s is not None else None
        if s is not None and s.order:
            s.end()
        self._flush_kv()
        ctx = run.ctx if run is not None else None
        prof = ctx.profile if ctx is not None else None
        if prof is not None and s is not None and before is not None:
            prof.bytes_uploaded += s.stats.bytes_streamed - before[0]
            prof.add("cuda copy (device)", (s.stats.copy_ms - before[1]) / 1e3)
            prof.add("cuda copy stall (device)", (s.stats.stall_ms - before[2]) / 1e3)

    def _flush_kv(self) -> None:
        if self._kv_pending:
            self.rt.kv_stream.synchronize()
            self._kv_pending.clear()
        self._kv_done.clear()

    def _weight_bytes(self, name: str) -> torch.Tensor:
        t = self._resident.get(name)
        if t is not None:
            return t
        views = self._run.views
        v = views.get(name)
        if v is None:
            layer = self._run.layer_of.get(name)
            if layer is None:
                raise RuntimeError(f"{name} is neither resident on {self.name} nor streamed in this run")
            v = views[name] = self.streamer.acquire(layer)[name]
        return v

    def _after(self, node: Node, ctx) -> None:
        if self._run is not None and not self._hold_release:
            for layer in self._run.release_at.get((ctx.ubatch, node.id), ()):
                self.streamer.release(layer)

    # -- a layer-major prompt in static form (core/layer_replay.py) drives the ring itself ----------
    def streamed_layers(self) -> set[int]:
        return set(self._run.layer_of.values()) if self._run is not None else set()

    def hold_releases(self, on: bool) -> None:
        """on: nodes no longer release their streamed layer (a captured graph must not record the
        ring's events); the caller acquires and releases each layer around its ubatches."""
        self._hold_release = on

    def acquire_layer(self, layer: int) -> int:
        """The compute stream waits for `layer`'s copy; returns the ring slot holding it (a graph that
        read the slot's bytes replays only for the same slot)."""
        self.streamer.acquire(layer)
        return self.streamer.slot_of[layer].index

    def release_layer(self, layer: int) -> None:
        self.streamer.release(layer)

    def stream_counters(self):
        """The streamer's cumulative StreamStats (None when nothing was ever streamed)."""
        return self.streamer.stats if self.streamer is not None else None

    def stream_stats(self) -> dict:
        """For `lstream bench`: bytes streamed per run, achieved GB/s of the copies, share of copy
        time the compute stream did not wait for, cumulative copy/stall ms and run count."""
        st = self.stream_counters()
        if st is None or st.runs == 0:
            return {}
        return {"bytes": st.bytes_streamed / st.runs, "gbps": st.bytes_streamed / (st.copy_ms * 1e6) if st.copy_ms else 0.0,
                "hidden": st.hidden_fraction, "copy_ms": st.copy_ms, "stall_ms": st.stall_ms, "runs": st.runs}
