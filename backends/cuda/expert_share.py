"""A device share of a host-expert decode step (--cpu-moe / -ncmoe): of a token's routed experts, the
device computes `n` itself, copying their bytes out of the pinned expert arena while the CPU computes
the others; the two partial sums meet on the device.

Why: a host-expert layer's decode is bound by the CPU reading its routed experts (Qwen3-30B-A3B: 8
of ~2.65 MB each, ~0.45 ms a layer on the H200's 16-core host); the copy engine reads host memory
at the same time at PCIe speed (55 GB/s), so n of them crossing to the GPU cut the CPU's bytes by
n/8 at the price of one 2-D copy per expert (its gate, up and down rows, which lie one tensor apart
in the arena) and two kernel launches.

On this segment path (LSTREAM_HOP_GRAPHS=0) only with an explicit --moe-share N; the default (auto)
shares in steps replayed as one graph (hop_share.py). Measured on the H200 (8-layer
Qwen3-30B-A3B shape, -ncmoe 8, tools/profile_hops.py): the CPU's expert time per layer fell with n
as expected (400 -> 240 / 213 us at n = 4 / 5) but the share's own host work (the copies' and the
weights' enqueueing, the graph replay, the add) cost ~200 us a layer (~600 us with the kernels
launched from Python), so a token took 6.88 ms without it and 7.12 / 6.68 ms with it, and
`lstream bench` tg32 fell from 129.4 to 118.2 t/s at n = 5.

All on the compute stream, in order: the copies into the share slot, the experts' weights, the
kernels; the CPU's part is sent up after them (GraphsMixin.send_up) and added. The slot is reused by
the next layer, whose copies come after this layer's kernels on the same stream.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import moe_kernels as mk


class ExpertShare:
    def __init__(self, backend, streamer, n_max: int):
        self.be, self.st, self.n_max = backend, streamer, n_max
        self.rt = backend.rt
        self._bufs: dict[int, torch.Tensor] = {}  # expert bytes -> slot (3, n_max, expert bytes)
        self._layers: dict[int, tuple | None] = {}  # MoE node id -> its copy and kernel operands, or None
        self._w_pin = self.rt.alloc_host(4 * n_max)[0].view(torch.float32).view(1, n_max)
        self._w_dev = torch.empty((1, n_max), dtype=torch.float32, device=backend.device)
        self._ids = torch.arange(n_max, dtype=torch.int64, device=backend.device).view(1, n_max)
        self.experts_computed = 0
        self._graphs: dict[tuple, tuple] = {}  # (layer node, n, x's address) -> (graph, its output)
        self._pool = None
        self._use_graphs = getattr(backend, "graphs", False) and os.environ.get("LSTREAM_SHARE_GRAPHS") != "0"

    def layer(self, node) -> tuple | None:
        """(arena offset of expert 0's first row, pitch between the tensors, expert bytes, slot, gate/up/
        down as the kernels' operands) for node's layer, made once; None when the share cannot take it:
        gate, up and down of one expert size, of types the kernels read (gate and up alike), one tensor
        apart in a pinned arena."""
        if node.id in self._layers:
            return self._layers[node.id]
        es = [self.be.residency[n] for n in node.weights[:3]]
        eb = es[0].expert_nbytes
        offs = [self.st.offset[e.name] for e in es]
        srt = sorted(offs)
        ok = (self.st.pinned and all(e.qtype in mk.TYPES and e.expert_nbytes == eb for e in es)
              and es[0].qtype == es[1].qtype and srt[1] - srt[0] == srt[2] - srt[1] > 0)
        if not ok:
            self._layers[node.id] = None
            return None
        buf = self._bufs.get(eb)
        if buf is None:
            buf = self._bufs[eb] = torch.empty((3, self.n_max, eb), dtype=torch.uint8, device=self.be.device)
        # slot row t holds the tensor of rank t in the arena (the file's order); slot j is expert j
        ex = [mk.Experts(e.qtype, self.n_max, e.shape[1], e.shape[2],
                         buf[srt.index(o)].view(self.n_max * e.shape[1], -1)) for o, e in zip(offs, es)]
        hit = self._layers[node.id] = (self.st.layer_start[node.layer] + srt[0], srt[1] - srt[0], eb, buf, ex)
        return hit

    def run(self, node, x: torch.Tensor, experts: np.ndarray, weights: np.ndarray) -> torch.Tensor:
        """x (1, dim) on the device; experts, weights: the n (<= n_max) routed experts it computes
        here and their routing weights (node's layer known usable). Returns their weighted sum
        (1, dim) fp32, enqueued."""
        base, pitch, eb, buf, ex = self._layers[node.id]
        cs = self.rt.compute_stream
        n = len(experts)
        for j, e in enumerate(experts):  # expert e's rows of the 3 tensors, one tensor apart
            self.rt.copy_rows(buf[0, j], self.n_max * eb, self.st.buf, base + int(e) * eb, pitch, eb, 3, cs)
        self._w_pin[0, :n] = torch.from_numpy(np.asarray(weights, dtype=np.float32))
        self.rt.copy(self._w_dev[:, :n], self._w_pin[:, :n], cs)  # (the compute stream is torch's current)
        self.experts_computed += n
        return self._compute(node.id, x, n, ex)

    def _compute(self, nid, x, n: int, ex) -> torch.Tensor:
        """The kernels, replayed from a CUDA graph per layer on a GPU: their inputs (x, the slot, the
        weights) are the same buffers every step, and two Triton launches from Python cost more
        host time than the CPU's share of the experts saves."""
        def kernels():
            return mk.decode(x, self._ids[:, :n], self._w_dev[:, :n], ex[0], ex[2], up=ex[1])
        if not self._use_graphs:
            return kernels()
        key = (nid, n, x.data_ptr())
        hit = self._graphs.get(key)
        if hit is None:
            y = kernels()  # this step's value; the kernels compiled before the capture
            if self._pool is None:
                self._pool = self.be.graph_pool()
            out = {}
            graph = self.be.capture_part(lambda: out.setdefault("y", kernels()), self._pool)
            self._graphs[key] = (graph, out["y"])
            return y
        graph, y = hit
        graph.replay()
        return y
