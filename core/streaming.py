"""Streaming non-resident layers to a device: pinned host staging, a ring of device slots, prefetch.

No torch here: the device backend hands in a runtime `rt` (backends/cuda.py's CudaRuntime, or the
test-only backends/fake_device.py) with these methods:

    rt.alloc_host(nbytes) -> (uint8 host buffer, pinned: bool)   # one arena, pinned once at load
    rt.alloc_device(nbytes) -> uint8 device buffer
    rt.host_view(array) -> uint8 host buffer of a host array's bytes
    rt.copy(dst, src, stream)       # async copy enqueued on `stream`
    rt.new_event(timing=False), ev.record(stream), stream.wait_event(ev), ev.synchronize(),
    ev.elapsed_time(other) (ms), rt.compute_stream, rt.copy_stream

Layout: the arena holds the streamed tensors layer after layer, each layer one contiguous run,
and every slot mirrors a layer's layout, so one layer crosses PCIe as ONE copy.

Ordering (per slot s, all on the device, the host never blocks):
    copy stream:    wait(s.compute_done) -> copy layer L into s -> record(s.copy_done)
    compute stream: wait(s.copy_done) -> ops of L read s -> record(s.compute_done)
so compute waits only for its own layer, and a slot is refilled only after the compute that read
it has finished. A copy is issued only once the previous user's compute_done has been recorded
(host order), i.e. with n slots up to n-1 layers ahead of the layer computing.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from .residency import ResidencyMap, State, TensorEntry

ALIGN = 256  # bytes; every tensor view starts aligned (Triton/cuBLAS like 16+)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class StreamStats:
    bytes_streamed: int = 0
    copies: int = 0
    copy_ms: float = 0.0  # device time the copy engine spent on weight copies
    stall_ms: float = 0.0  # device time the compute stream waited for a copy
    first_copy_ms: float = 0.0  # copies before the first compute of a run (cannot be hidden)
    runs: int = 0

    @property
    def hidden_fraction(self) -> float:
        """Share of copy time that compute hid (1.0: the compute stream never waited)."""
        return 1.0 - self.stall_ms / self.copy_ms if self.copy_ms > 0 else 1.0

    def reset(self) -> None:
        self.__init__()


@dataclass
class Slot:
    index: int
    buf: Any  # device uint8 buffer of slot_bytes
    copy_done: Any
    compute_done: Any
    layer: int | None = None  # layer whose bytes are (being) copied in
    released: bool = True  # compute_done recorded after the last read of `layer`
    gen: int = 0  # number of fills, for tests
    gen_spec: int = -1  # gen of the last speculative fill


class HostStaging:
    """Every streamed tensor copied once into one pinned arena, at its exact size (aligned)."""

    def __init__(self, rt, layers: dict[int, list[TensorEntry]]):
        self.offsets: dict[str, tuple[int, int]] = {}  # name -> (offset, nbytes) in the arena
        self.layer_range: dict[int, tuple[int, int]] = {}  # layer -> (offset, nbytes), contiguous
        off = 0
        for layer in sorted(layers):
            start = off
            for e in layers[layer]:
                self.offsets[e.name] = (off, e.nbytes)
                off = _align(off + e.nbytes)
            self.layer_range[layer] = (start, off - start)
        self.total = off
        self.buf, self.pinned = rt.alloc_host(max(off, 1))
        if not self.pinned:
            warnings.warn(f"could not pin {off / 2**30:.2f} GiB of host memory: streaming from pageable "
                          "memory (copies are synchronous and about half as fast)", RuntimeWarning, stacklevel=2)
        for layer in layers:
            for e in layers[layer]:
                o, n = self.offsets[e.name]
                self.buf[o:o + n].copy_(rt.host_view(e.data))
                # The pinned copy is now the tensor's host data: the CPU backend reads it too,
                # and the memory-mapped pages can be dropped.
                e.data = rt.as_array(self.buf[o:o + n], like=e.data)
                e.state = State.PINNED


class LayerStreamer:
    def __init__(self, rt, residency: ResidencyMap, names: list[str], n_slots: int = 3):
        """names: the tensors that may be streamed (non-resident, uploaded when the policy says so)."""
        if n_slots < 2:
            raise ValueError(f"a streaming ring needs at least 2 slots, found {n_slots}")
        self.rt = rt
        layers: dict[int, list[TensorEntry]] = {}
        for n in names:
            e = residency[n]
            layers.setdefault(e.layer, []).append(e)
        self.layers = layers
        self.staging = HostStaging(rt, layers)
        self.slot_bytes = max((n for _, n in self.staging.layer_range.values()), default=0)
        self.slots = [Slot(i, rt.alloc_device(max(self.slot_bytes, 1)), rt.new_event(), rt.new_event())
                      for i in range(n_slots)]
        self.stats = StreamStats()
        self.order: list[int] = []
        self.next_issue = 0  # index into order of the next layer to copy
        self.slot_of: dict[int, Slot] = {}
        self.active: set[int] = set()  # layers acquired and not yet released
        self._stalls: list[tuple[Any, Any]] = []
        self._copies: list[tuple[Any, Any]] = []  # (start, end) events of this run's fills
        self._spec_copies: list[tuple[Any, Any]] = []  # speculative fills, counted in the next run
        self.speculate = True
        self._speculating = False
        self.log: list[tuple] = []  # (what, layer, slot, gen) for tests
        self._views: dict[tuple[int, int], dict[str, Any]] = {}

    # -- a run ---------------------------------------------------------------------------------
    def begin(self, order: list[int]) -> None:
        """order: the streamed layers in the order this run computes them."""
        order = [layer for layer in dict.fromkeys(order) if layer in self.layers]
        spec = self.slot_of if self.order == order else {}  # speculative prefetch of the last end()
        self.order = order
        self.next_issue = 0
        self.active.clear()
        self._copies, self._spec_copies = self._spec_copies, []
        self.slot_of = {}
        # keep fills of layers in flight from the previous end() when they match this run's start
        for k, layer in enumerate(order[:len(self.slots)]):
            s = spec.get(layer)
            if s is None or s is not self.slots[k % len(self.slots)] or s.layer != layer:
                break
            self.slot_of[layer] = s
            s.released = False  # its bytes now wait for this run's compute
            self.log.append(("reuse", layer, s.index, s.gen))
            self.next_issue = k + 1
        self._issue_ahead()

    def _issue_ahead(self) -> None:
        n = len(self.slots)
        while self.next_issue < len(self.order):
            k = self.next_issue
            slot = self.slots[k % n]
            if not slot.released:  # its previous layer's compute has not been recorded yet
                break
            self._fill(slot, self.order[k])
            self.next_issue += 1

    def _fill(self, slot: Slot, layer: int) -> None:
        rt = self.rt
        off, nbytes = self.staging.layer_range[layer]
        cs = rt.copy_stream
        cs.wait_event(slot.compute_done)  # the slot's previous reader has finished
        t0, t1 = rt.new_event(timing=True), rt.new_event(timing=True)
        t0.record(cs)
        rt.copy(slot.buf[:nbytes], self.staging.buf[off:off + nbytes], cs)
        t1.record(cs)
        slot.copy_done.record(cs)
        (self._spec_copies if self._speculating else self._copies).append((t0, t1))
        slot.layer = layer
        slot.released = False
        slot.gen += 1
        self.slot_of[layer] = slot
        self.stats.bytes_streamed += nbytes
        self.stats.copies += 1
        self.log.append(("fill", layer, slot.index, slot.gen))

    def acquire(self, layer: int) -> dict[str, Any]:
        """Called before the first compute op that reads `layer`'s streamed weights.

        Makes the compute stream wait for this layer's copy; returns name -> device uint8 view."""
        if layer not in self.slot_of:
            if layer not in self.order:
                raise KeyError(f"layer {layer} is not streamed in this run")
            # not issued yet (ring full of unreleased layers): release order is the caller's job
            self._issue_ahead()
            if layer not in self.slot_of:
                raise RuntimeError(f"layer {layer}: every ring slot is still held by an unreleased layer")
        slot = self.slot_of[layer]
        if layer not in self.active:
            rt = self.rt
            cs = rt.compute_stream
            e0, e1 = rt.new_event(timing=True), rt.new_event(timing=True)
            e0.record(cs)
            cs.wait_event(slot.copy_done)
            e1.record(cs)
            self._stalls.append((e0, e1))
            self.active.add(layer)
            self.log.append(("acquire", layer, slot.index, slot.gen))
        views = self._views.get((slot.index, layer))
        if views is None:  # slots never move: the views of a (slot, layer) pair are made once
            base, _ = self.staging.layer_range[layer]
            views = self._views[(slot.index, layer)] = {
                e.name: slot.buf[self.staging.offsets[e.name][0] - base:][:e.nbytes] for e in self.layers[layer]}
        return views

    def release(self, layer: int) -> None:
        """Called after the last compute op that reads `layer` has been enqueued."""
        if layer not in self.active:
            return
        slot = self.slot_of[layer]
        slot.compute_done.record(self.rt.compute_stream)
        slot.released = True
        self.active.discard(layer)
        self.log.append(("release", layer, slot.index, slot.gen))
        self._issue_ahead()
        if self.speculate and self.next_issue >= len(self.order):
            self._speculate()

    def end(self) -> None:
        """After a run (the caller has synchronized its compute stream): release what is left and
        read this run's timings. Never waits for the speculative copies."""
        for layer in list(self.active):
            self.release(layer)
        for slot in self.slots:  # filled but never read (a run that failed or was interrupted)
            if not slot.released:
                slot.released = True
        for t0, t1 in self._copies:
            t1.synchronize()  # done: the compute that read the slot waited for it
            self.stats.copy_ms += t0.elapsed_time(t1)
        for e0, e1 in self._stalls:
            e1.synchronize()
            self.stats.stall_ms += e0.elapsed_time(e1)
        self._copies, self._stalls = [], []
        self.stats.runs += 1
        if self.speculate:
            self._speculate()
        self.slot_of = {layer: s for layer, s in self.slot_of.items() if s.layer == layer}

    def _speculate(self) -> None:
        """Start copying this run's first layers into the slots they will use if the next run
        streams the same layers (the next ubatch of a prompt does), as soon as each slot is free.
        A slot still holding its layer needs no copy; a wrong guess costs copy-engine time only."""
        n = len(self.slots)
        self._speculating = True
        try:
            for k, layer in enumerate(self.order[:n]):
                slot = self.slots[k % n]
                if slot.layer == layer and (slot.released or slot.gen_spec == slot.gen):
                    continue
                if not slot.released:
                    continue  # still read by this run; end() tries again
                self._fill(slot, layer)
                slot.released = True  # nothing reads it unless the next run starts with `layer`
                slot.gen_spec = slot.gen
                self.log.append(("speculate", layer, slot.index, slot.gen))
        finally:
            self._speculating = False

    def forget(self) -> None:
        """Drop what the slots hold (benchmarks: each repetition starts cold)."""
        self.rt.synchronize()
        for s in self.slots:
            s.layer = None
            s.released = True
        self.slot_of = {}
        self._spec_copies = []

    def device_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)
