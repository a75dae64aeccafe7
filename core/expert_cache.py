"""A VRAM cache of routed experts (--expert-cache GIB), for decode with the experts in host memory.

Routing is skewed and sticky: the experts a token picks at a layer are often the ones recent tokens
picked there. The cache keeps the last used experts of every host-expert layer resident (least
recently used evicted), so a decode step computes its cached experts on the device and leaves only
the others to the CPU. An expert missed this step is copied in for the next ones while the CPU
computes it (from the pinned arena of core/expert_streaming.py, on the copy stream: the host never
waits). Same runtime `rt` as the ring (no torch here).

Layout: per expert tensor kind (gate, up, down) one device buffer of n_slots experts, so a slot is
one expert of any layer and the decode kernels read slots by id as they read a layer's experts.

Ordering (all on the device):
    copy stream:    wait(done[s]) (the slot's last reader) -> copy the expert -> record(ready[s])
    compute stream: wait(ready[s]) before reading slot s -> ... -> record(done[s])
"""
from __future__ import annotations

from collections import OrderedDict

KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


class ExpertCache:
    def __init__(self, rt, streamer, capacity_bytes: int):
        """streamer: the ExpertStreamer holding every host expert in its pinned arena."""
        self.rt, self.st = rt, streamer
        self.expert_bytes: dict[str, int] = {}
        self.entries: dict[int, dict[str, object]] = {}  # layer -> kind -> its TensorEntry
        for layer, es in streamer.layers.items():
            for e in es:
                kind = next((k for k in KINDS if k in e.name), None)
                if kind is None:
                    raise ValueError(f"--expert-cache: {e.name} is not a gate, up or down expert tensor")
                if self.expert_bytes.setdefault(kind, e.expert_nbytes) != e.expert_nbytes:
                    raise ValueError(f"--expert-cache needs one expert size per tensor kind, found "
                                     f"{self.expert_bytes[kind]} and {e.expert_nbytes} bytes for {kind}")
                self.entries.setdefault(layer, {})[kind] = e
        per = sum(self.expert_bytes.values())
        self.n_slots = int(capacity_bytes // per) if per else 0
        if self.n_slots < 1:
            raise ValueError(f"--expert-cache of {capacity_bytes / 2**30:.3g} GiB holds no expert: one takes "
                             f"{per / 2**20:.1f} MiB")
        self.bufs = {k: rt.alloc_device(self.n_slots * b) for k, b in self.expert_bytes.items()}
        self.slot_of: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot, LRU first
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.ready: dict[int, object] = {}  # slot -> event after its copy
        self.done: dict[int, object] = {}  # slot -> event after its last read
        self.hits = self.lookups = self.inserts = 0

    @property
    def device_bytes(self) -> int:
        return self.n_slots * sum(self.expert_bytes.values())

    def lookup(self, layer: int, experts) -> dict[int, int]:
        """The routed experts of `layer` held here, expert -> slot (now most recently used); the
        compute stream waits for their copies."""
        hits: dict[int, int] = {}
        waited = set()
        for x in experts:
            self.lookups += 1
            s = self.slot_of.get((layer, x))
            if s is None:
                continue
            self.slot_of.move_to_end((layer, x))
            hits[x] = s
            ev = self.ready.get(s)
            if ev is not None and id(ev) not in waited:
                waited.add(id(ev))
                self.rt.compute_stream.wait_event(ev)
        self.hits += len(hits)
        return hits

    def release(self, slots) -> None:
        """After the compute that reads `slots` has been enqueued."""
        ev = self.rt.new_event()
        ev.record(self.rt.compute_stream)
        for s in slots:
            self.done[s] = ev

    def insert(self, layer: int, experts, keep=()) -> None:
        """Copy the experts of `layer` not held yet into slots (free ones, else the least recently
        used, never one of `keep`: the slots this step reads)."""
        rt, cs, st = self.rt, self.rt.copy_stream, self.st
        for x in experts:
            if (layer, x) in self.slot_of:
                continue
            if self.free:
                s = self.free.pop()
            else:
                victim = next((k for k, v in self.slot_of.items() if v not in keep), None)
                if victim is None:
                    return
                s = self.slot_of.pop(victim)
            if s in self.done:
                cs.wait_event(self.done[s])
            for kind, e in self.entries[layer].items():
                eb = self.expert_bytes[kind]
                a = st.layer_start[layer] + st.offset[e.name] + x * eb
                rt.copy(self.bufs[kind][s * eb:(s + 1) * eb], st.buf[a:a + eb], cs)
                st.stats.bytes_streamed += eb
            ev = rt.new_event()
            ev.record(cs)
            self.ready[s] = ev
            self.slot_of[(layer, x)] = s
            self.inserts += 1

    def kind_entry(self, layer: int, kind: str):
        return self.entries[layer][kind]
