"""Decode's FFN shared between the host and the device (the policy's `share`).

In a decode step the CPU computes its layers at the host's memory bandwidth while the PCIe link
idles (the ring's slots hold the streamed layers). Host reads and pinned copies add up (H200 host:
~100 GB/s of CPU reads and ~55 GB/s of copies at once), so for each layer the CPU computes, the
device takes the last FFN columns: gate/up rows [r:], down columns [r:], streamed from the pinned
arena every step through a ring of its own while the CPU computes columns [:r]. Per layer the
device reads x once and returns one partial down product that the CPU adds: one hop each way.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ...core.qtypes import QTYPE_INFO
from . import decode_kernels as dk
from . import gemv as cg

GRAIN = 256  # FFN columns: a K-quant super-block is never cut between the two sides
SLOTS = 4  # the share's ring: layers copied ahead of the CPU


@dataclass
class _Geo:
    """One layer's device part: where its bytes are in the arena and in a slot."""
    gelu: bool
    parts: list  # (slot offset, nbytes, qtype, n_rows, n_cols) of gate[r:], up[r:] (stacked when alike)
    down_off: int
    down_bytes: int


def ffn_columns(n_ff: int, frac: float) -> int:
    """The CPU's FFN columns r when the device takes about `frac` of them (a multiple of GRAIN)."""
    r = int(round(n_ff * (1.0 - frac) / GRAIN)) * GRAIN
    return min(max(r, GRAIN), n_ff)


class FFNShare:
    def __init__(self, dev, entries: dict[int, tuple], r: int, n_slots: int = SLOTS):
        """entries: layer -> (gate, up, down TensorEntry, gelu), in decode order; their bytes are in
        the device's pinned staging arena. r: the columns the CPU keeps."""
        self.dev, self.rt, self.r = dev, dev.rt, r
        st = dev._ensure_streamer().staging
        self.arena, self.offsets = st.buf, st.offsets
        self.order = list(entries)
        self.index = {layer: i for i, layer in enumerate(self.order)}
        self.geo: dict[int, _Geo] = {}
        self.src: dict[int, tuple] = {}
        size = 0
        for layer, (g, u, d, gelu) in entries.items():
            m = g.n_rows - r
            parts, off = [], 0
            for e in (g, u):
                rb = e.nbytes // e.n_rows
                parts.append((off, m * rb, e.qtype, m, e.n_cols))
                off += m * rb
            if g.qtype == u.qtype:  # one GEMV for both
                parts = [(0, off, g.qtype, 2 * m, g.n_cols)]
            info = QTYPE_INFO[d.qtype]
            row = d.nbytes // d.n_rows
            skip = r // info.block_size * info.type_size
            self.geo[layer] = _Geo(gelu, parts, off, d.n_rows * (row - skip))
            self.src[layer] = (g, u, d, row, skip)
            size = max(size, off + d.n_rows * (row - skip))
        self.n_embd = entries[self.order[0]][2].n_rows if entries else 0
        self.slots = [[self.rt.alloc_device(size), self.rt.new_event(), self.rt.new_event(), None]
                      for _ in range(min(n_slots, len(self.order)))]
        self._bufs: dict[int, tuple] = {}  # rows -> (pinned x, device x, device y, pinned y, done)
        self.runs = 0
        self._graphs: dict[tuple[int, int], object] = {}  # (layer, rows) -> its device part captured
        self.use_graphs = (self.rt.device.type == "cuda" and getattr(dev, "graphs", False)
                           and os.environ.get("LSTREAM_SHARE_GRAPHS", "1") != "0")
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._copies: dict[tuple[int, int], list] = {}  # (layer index, slot) -> copy_2d arguments
        self._next = 0  # the next visit: visit v is layer order[v % n] in slot v % slots
        for i in range(len(self.slots)):
            self._fill(i)

    def cols(self, layer: int) -> int | None:
        """The CPU's FFN columns of `layer`, None where the device takes no part of it."""
        return self.r if layer in self.index else None

    def device_bytes(self) -> int:
        return sum(s[0].numel() for s in self.slots)

    # -- the copy engine ----------------------------------------------------------------------
    def _plan_copies(self, k: int, s: int) -> list[tuple]:
        """copy_2d's arguments that bring layer order[k] into slot s: gate and up rows [r:] (one row
        each), down's columns [r:]; made once, _fill runs on the CPU's critical path (per layer ~0.23
        ms through torch's stream context and slicing, measured 2026-12-03)."""
        layer = self.order[k]
        g, u, d, row, skip = self.src[layer]
        geo, buf, m = self.geo[layer], self.slots[s][0], g.n_rows - self.r
        out, off = [], 0
        for e in (g, u):
            o, _ = self.offsets[e.name]
            rb = e.nbytes // e.n_rows
            out.append((buf[off:off + m * rb], o + self.r * rb, m * rb, m * rb, 1))
            off += m * rb
        o, _ = self.offsets[d.name]
        out.append((buf[geo.down_off:geo.down_off + geo.down_bytes], o + skip, row, row - skip, d.n_rows))
        return out

    def _fill(self, v: int) -> None:
        """Visit v's layer (order[v % n]) into slot v % slots, after the slot's last reader."""
        k, s = v % len(self.order), v % len(self.slots)
        slot = self.slots[s]
        cs = self.rt.copy_stream
        cs.wait_event(slot[2])
        plan = self._copies.get((k, s))
        if plan is None:
            plan = self._copies[(k, s)] = self._plan_copies(k, s)
        for dst, offset, pitch, width, height in plan:
            self.rt.copy_2d(dst, self.arena, offset, pitch, width, height, cs)
        slot[1].record(cs)
        slot[3] = self.order[k]

    # -- a layer of a decode step (called by the CPU backend's program) -------------------------
    def start(self, layer: int, x: np.ndarray) -> None:
        """x (rows, n_embd) float32, the FFN's input: the device's columns start on it, no wait (one
        graph launch per layer). Launching them from a thread of its own while the CPU computed
        measured no faster: the thread took a core from the numba team (2026-12-03)."""
        io = self._io(x.shape[0])
        io[0].numpy()[...] = x
        self._launch(layer, io)

    def finish(self, layer: int, out: np.ndarray) -> None:
        """out (rows, n_embd): the CPU's partial down product; the device's is added to it."""
        io = self._bufs[out.shape[0]]
        io[4].synchronize()
        out += io[3].numpy()

    def _launch(self, layer: int, io) -> None:
        # visits count on across steps, so the copies started at a step's end (the next step's
        # first layers) land in the slots that step reads, whatever the layer count
        v = self._next
        if self.order[v % len(self.order)] != layer:  # not the expected layer: count from this one
            v = self.index[layer]
        self._next = v + 1
        slot = self.slots[v % len(self.slots)]
        if slot[3] != layer:  # not copied ahead (the first step, or visits out of order): copy it now
            self._fill(v)
        cs = self.rt.compute_stream
        cs.wait_event(slot[1])
        key = (layer, io[0].shape[0])
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
        elif self.use_graphs:  # (its warm-up computes this step's columns)
            try:
                self._graphs[key] = self._capture(layer, io, slot)
            except RuntimeError as e:  # eager from here on: ~20 launches a layer through Python
                warnings.warn(f"decode FFN share runs eagerly: {e}", RuntimeWarning, stacklevel=2)
                self.use_graphs = False
                self.rt.synchronize()
                self._compute(layer, io, slot)
        else:
            self._compute(layer, io, slot)
        io[4].record(cs)
        slot[2].record(cs)
        if len(self.order) > len(self.slots):  # the slot's next layer, behind this one's reads
            self._fill(v + len(self.slots))
        self.runs += 1

    def _compute(self, layer: int, io, slot) -> None:
        """The device's columns of `layer` on the current stream: x up, gate|up, act, down, y down."""
        xh, xd, yd, yh, _ = io
        geo, buf = self.geo[layer], slot[0]
        xd.copy_(xh, non_blocking=True)
        xb = xd.to(self.dev.dtype)
        outs = [cg.gemv(xb, buf[o:o + n], qt, nr, nc, out=torch.empty((xb.shape[0], nr), dtype=torch.float32,
                                                                      device=xb.device))
                for o, n, qt, nr, nc in geo.parts]
        gu = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        m = gu.shape[1] // 2
        h = dk.act(gu[:, :m], gu[:, m:], geo.gelu, self.dev.dtype, self.dev.use_triton)
        d = self.src[layer][2]
        cg.gemv(h, buf[geo.down_off:geo.down_off + geo.down_bytes], d.qtype, d.n_rows, m, out=yd)
        yh.copy_(yd, non_blocking=True)

    def _capture(self, layer: int, io, slot):
        """A layer's device part as a CUDA graph (one launch instead of ~20 through Python): warmed
        up on a side stream, which computes this step's columns, then captured."""
        cs = self.rt.compute_stream
        side = torch.cuda.Stream(self.rt.device)
        side.wait_stream(cs)
        with torch.cuda.stream(side):
            self._compute(layer, io, slot)
        cs.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._compute(layer, io, slot)
        return graph

    def _io(self, rows: int):
        b = self._bufs.get(rows)
        if b is None:
            shape = (rows, self.n_embd)
            dev = lambda: torch.empty(shape, dtype=torch.float32, device=self.rt.device)  # noqa: E731
            b = self._bufs[rows] = (self.dev._pinned_f32(shape), dev(), dev(), self.dev._pinned_f32(shape),
                                    self.rt.new_event())
        return b


def ffn_entries(residency, layers, gelu_layers=frozenset()) -> dict[int, tuple]:
    """layer -> (gate, up, down, gelu) of the layers whose FFN the device can share: GGUF block
    types its GEMV reads, no biases, the hidden size a multiple of GRAIN."""
    out = {}
    for layer in layers:
        names = [f"blk.{layer}.ffn_{k}.weight" for k in ("gate", "up", "down")]
        if not all(n in residency for n in names) or f"blk.{layer}.ffn_down.bias" in residency:
            continue
        g, u, d = (residency[n] for n in names)
        if any(e.alias_of or e.qtype not in cg.GEMV_TYPES or len(e.shape) != 2 for e in (g, u, d)):
            continue
        if g.n_rows != u.n_rows or d.n_cols != g.n_rows or g.n_rows % GRAIN or g.n_rows < 2 * GRAIN:
            continue
        out[layer] = (g, u, d, layer in gelu_layers)
    return out


def configure(dev, cpu, layers, frac: float, gelu_layers=frozenset()) -> FFNShare | None:
    """Give the device `frac` of the FFN columns of the CPU's decode `layers` (0: none); the share
    is installed on the CPU backend, whose programs must then be compiled again. None where no
    layer can be shared or the share's ring does not fit in free VRAM."""
    old, cpu.share = cpu.share, None
    if old is not None:
        dev.rt.synchronize()  # its slots may still be read or written
    ents, r = {}, 0
    if frac > 0 and layers:
        staged = dev._ensure_streamer().staging.offsets
        ents = {layer: e for layer, e in ffn_entries(dev.residency, layers, gelu_layers).items()
                if all(x.name in staged for x in e[:3])}
    if ents:
        n_ff = next(iter(ents.values()))[0].n_rows
        ents = {layer: e for layer, e in ents.items() if e[0].n_rows == n_ff}
        r = ffn_columns(n_ff, frac)
        if r >= n_ff:
            ents = {}
    if old is not None and ents and old.r == r and old.order == list(ents):
        cpu.share = old
        return old
    for k in [k for k in cpu.share_w if k[1] != r]:
        del cpu.share_w[k]
    if not ents:
        return None
    try:
        cpu.share = FFNShare(dev, ents, r)
    except torch.OutOfMemoryError:
        return None
    return cpu.share
