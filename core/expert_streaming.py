"""Streaming experts to a device, expert by expert: the MoE counterpart of the layer ring
(core/streaming.py), with the same runtime `rt` (no torch here).

A MoE op whose experts live in host memory runs on the device when the upload policy wants some of
them (UploadPolicy.should_upload_expert, asked per expert with the tokens routed to it). It routes,
then acquires the experts it uploads: each crosses PCIe once into the slot of its layer, while the
CPU computes the experts left in host memory, and the device's compute waits only for the copy of the
expert it reads next. Staging: one pinned arena holding every host expert tensor as the file lays it
out (n_expert, rows, row bytes), so consecutive experts are one copy (all of a layer's: 3 copies).
Slots: EXPERT_LAYER_SLOTS device buffers, each one layer's expert tensors in the same layout; a slot
keeps its layer's experts until another layer takes it (least recently used), so the ubatches of a
prompt run layer-major (core/runner.py) upload each expert once per prompt, and a layer that comes
back to a slot still holding it (a small model, the next ubatch) copies only what it lacks.

Ordering (all on the device, the host never waits):
    copy stream:    wait(slot.compute_done) when the slot changes layer -> copy -> record(ready[e])
    compute stream: wait(ready[e]) for each expert it reads -> ... -> record(slot.compute_done)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from .residency import ResidencyMap, State, TensorEntry
from .streaming import StreamStats, _align

EXPERT_LAYER_SLOTS = 2  # layers of experts the device holds at once (fit-before-load reserves them)


@dataclass
class ExpertSlot:
    index: int
    buf: Any  # device uint8 buffer
    compute_done: Any
    layer: int | None = None
    ready: dict[int, Any] = field(default_factory=dict)  # expert -> event after its copy
    last_use: int = 0


class ExpertStreamer:
    def __init__(self, rt, residency: ResidencyMap, names: list[str], n_slots: int = EXPERT_LAYER_SLOTS):
        """names: the 3-D expert tensors in host memory that the device may upload."""
        self.rt = rt
        self.layers: dict[int, list[TensorEntry]] = {}
        for n in names:
            e = residency[n]
            self.layers.setdefault(e.layer, []).append(e)
        self.offset: dict[str, int] = {}  # tensor -> offset within its layer's range (arena and slot)
        self.layer_start: dict[int, int] = {}
        off = 0
        for layer in sorted(self.layers):
            self.layer_start[layer] = off
            for e in self.layers[layer]:
                self.offset[e.name] = off - self.layer_start[layer]
                off = _align(off + e.nbytes)
        self.slot_bytes = max((_align(self.offset[es[-1].name] + es[-1].nbytes) for es in self.layers.values()),
                              default=0)
        self.buf, self.pinned = rt.alloc_host(max(off, 1))
        if not self.pinned:
            warnings.warn(f"could not pin {off / 2**30:.2f} GiB of host memory for the experts: uploading from "
                          "pageable memory", RuntimeWarning, stacklevel=2)
        for es in self.layers.values():
            for e in es:
                self._stage(e)
        self.slots = [ExpertSlot(i, rt.alloc_device(max(self.slot_bytes, 1)), rt.new_event())
                      for i in range(n_slots)]
        self.stats = StreamStats()
        self.uploads = 0  # experts copied
        self.log: list[tuple[int, int]] = []  # (layer, expert) per upload, for tests
        self.prefetches = 0  # layers whose experts were copied ahead of their routing
        self.whole_runs = 0  # ubatches that found their layer's every expert in a slot (acquire_all)
        self._clock = 0

    def _stage(self, e: TensorEntry) -> None:
        base = self.layer_start[e.layer] + self.offset[e.name]
        eb = e.expert_nbytes
        for x in range(e.n_expert):
            self.buf[base + x * eb:base + (x + 1) * eb].copy_(self.rt.host_view(e.expert(x)))
        if hasattr(e.data, "shape"):  # one array (GGUF): the pinned copy becomes its host data
            e.data = self.rt.as_array(self.buf[base:base + e.nbytes], like=e.data)
            e.state = State.PINNED

    def _slot_for(self, layer: int) -> ExpertSlot:
        for s in self.slots:
            if s.layer == layer:
                return s
        s = min(self.slots, key=lambda s: s.last_use)
        self.rt.copy_stream.wait_event(s.compute_done)  # the slot's previous layer has been computed
        s.layer, s.ready = layer, {}
        return s

    def acquire(self, layer: int, experts: list[int]) -> "Callable[[int], dict[str, Any]]":
        """Copy the experts of `layer` the slot lacks (runs of consecutive ones as one copy per tensor),
        make the compute stream wait for each; returns expert -> {tensor: device uint8 view}, made
        when asked (the kernels read the slot whole: 3 x 128 views would cost ~1 ms a ubatch)."""
        rt = self.rt
        slot = self._copy(layer, experts)
        waited = set()
        for x in experts:
            ev = slot.ready[x]
            if id(ev) not in waited:
                waited.add(id(ev))
                rt.compute_stream.wait_event(ev)
        return lambda x: self.views(slot, x)

    def acquire_all(self, layer: int) -> bool:
        """When the slot of `layer` holds (or has queued) every expert of it, a prefetch's: make the
        compute stream wait for them and return True (a ubatch then needs no routing on the host to
        choose its uploads: there is nothing left to upload). Else False, nothing done."""
        slot = next((s for s in self.slots if s.layer == layer), None)
        if slot is None or len(slot.ready) < self.layers[layer][0].n_expert:
            return False
        self._clock += 1
        slot.last_use = self._clock
        for ev in {id(ev): ev for ev in slot.ready.values()}.values():
            self.rt.compute_stream.wait_event(ev)
        self.whole_runs += 1
        return True

    def prefetch_next(self, layer: int) -> int | None:
        """Start copying every expert of the host-expert layer after `layer` into the other slot (a
        ubatch that uploads most of a layer will upload most of the next): its copy then overlaps
        this layer's compute instead of waiting for the next layer's routing. Returns that layer."""
        later = [x for x in self.layers if x > layer]
        if not later or len(self.slots) < 2:
            return None
        nxt = min(later)
        self._copy(nxt, range(self.layers[nxt][0].n_expert))
        self.prefetches += 1
        return nxt

    def _copy(self, layer: int, experts) -> ExpertSlot:
        """Enqueue on the copy stream the copies of `experts` of `layer` that its slot lacks."""
        rt = self.rt
        self._clock += 1
        slot = self._slot_for(layer)
        slot.last_use = self._clock
        need = sorted(x for x in set(experts) if x not in slot.ready)
        runs: list[list[int]] = []
        for x in need:
            if runs and runs[-1][-1] == x - 1:
                runs[-1].append(x)
            else:
                runs.append([x])
        cs = rt.copy_stream
        for run in runs:
            for e in self.layers[layer]:
                eb = e.expert_nbytes
                o = self.offset[e.name] + run[0] * eb
                n = len(run) * eb
                a = self.layer_start[layer] + o
                rt.copy(slot.buf[o:o + n], self.buf[a:a + n], cs)
                self.stats.bytes_streamed += n
                self.stats.copies += 1
            ev = rt.new_event()
            ev.record(cs)
            for x in run:
                slot.ready[x] = ev
                self.log.append((layer, x))
            self.uploads += len(run)
        return slot

    def layer_views(self, layer: int) -> dict[str, Any]:
        """The slot holding `layer`: each tensor's whole (n_expert, ...) bytes as a device uint8 view (one
        grouped kernel reads the acquired experts by id; the others' bytes are stale)."""
        slot = next(s for s in self.slots if s.layer == layer)
        return {e.name: slot.buf[self.offset[e.name]:self.offset[e.name] + e.nbytes] for e in self.layers[layer]}

    def views(self, slot: ExpertSlot, x: int) -> dict[str, Any]:
        out = {}
        for e in self.layers[slot.layer]:
            o = self.offset[e.name] + x * e.expert_nbytes
            out[e.name] = slot.buf[o:o + e.expert_nbytes]
        return out

    def release(self, layer: int) -> None:
        """After the compute that reads `layer`'s experts has been enqueued."""
        for s in self.slots:
            if s.layer == layer:
                s.compute_done.record(self.rt.compute_stream)

    def device_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)
