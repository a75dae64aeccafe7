"""The device's share of a host-expert decode step replayed as one graph (--moe-share N with
core/hop_replay.py): of each token's routed experts the device computes the last N itself while the
CPU computes the others, so the two read host memory at once (the CPU's reads and the copy engine's
add up: ~100 + 55 GB/s measured on the H200's host, tools/gpu_notes.md).

Per hop, the host, once it has routed: writes the N weights into pinned memory, enqueues one 2-D copy
per expert (its gate, up and down rows, one tensor apart in the pinned arena) into the share slot on
its copy stream, then raises the hop's shared flag on that stream (after the copies). The graph waits
for that flag, copies the weights up and runs the expert kernels (moe_kernels.decode) on the slot;
their sum meets the CPU's answer. The slot is reused by every layer: the next hop's copies are
enqueued only after the device posts that hop, after this hop's kernels.

Its operands (arena offsets, the slot, the kernels' views) are ExpertShare's (the segment path's share).
"""
from __future__ import annotations

import numpy as np
import torch

from . import moe_kernels as mk


def share_count(setting: int, top_k: int) -> int:
    """Experts of a token's top_k the device takes: setting < 0 (auto) half of them (the copy engine's
    55 GB/s and the CPU's ~65 GB/s of expert reads then take about as long), else at most top_k."""
    return top_k // 2 if setting < 0 else min(setting, top_k)


class HopShare:
    def __init__(self, backend, box, n_share: int):
        self.be, self.box, self.rt = backend, box, backend.rt
        self.n_share = n_share
        n_max = max(1, n_share if n_share >= 0 else 64)  # (auto: at most top_k // 2 of any MoE there is)
        self._w_pin = self.rt.alloc_host(4 * box.n * n_max)[0].view(torch.float32).view(box.n, n_max)
        self._w_np = self._w_pin.numpy()
        self._slots: dict = {}  # (slot, expert bytes) -> a copy descriptor retargeted to each expert
        self._w_dev = torch.empty((box.n, n_max), dtype=torch.float32, device=backend.device)
        self._ids = torch.arange(n_max, dtype=torch.int64, device=backend.device).view(1, n_max)
        self.layers: list = [None] * box.n  # hop -> (experts taken, ExpertShare.layer's operands) or None
        self.experts_computed = 0

    def device(self, j: int, node, x: torch.Tensor):
        """Inside the capture: hop j's shared experts' weighted sum (1, dim) fp32, or None when the
        layer cannot be shared."""
        if x.shape[0] != 1 or len(node.inputs) != 2:
            return None
        k = node.params["top_k"]
        if self.be._share is None:  # (the segment path's share: its slot holds a token's top_k experts)
            from .expert_share import ExpertShare
            self.be._share = ExpertShare(self.be, self.be._expert_streamer(), k)
        es = self.be._share
        lay = es.layer(node) if es.n_max >= k else None
        if lay is None:
            return None
        n = min(share_count(self.n_share, k), self._w_dev.shape[1])
        if n <= 0:
            return None
        self.layers[j] = (n, lay)
        self.rt.wait_value(self.box.flag_address(2, j), 1, self.rt.current_stream())
        w = self._w_dev[j:j + 1, :n]
        w.copy_(self._w_pin[j:j + 1, :n], non_blocking=True)
        ex = lay[4]
        return mk.decode(x, self._ids[:, :n], w, ex[0], ex[2], up=ex[1])

    def issue(self, j: int, ids: np.ndarray, w: np.ndarray) -> np.ndarray | None:
        """On the host, once hop j is routed: its last n experts' copies and shared flag enqueued;
        returns the mask of the pairs taken (the CPU skips them), or None (a layer not shared)."""
        if self.layers[j] is None:
            return None
        n, (base, pitch, eb, buf, _) = self.layers[j]
        k, rt, es = ids.shape[1], self.rt, self.be._share
        self._w_np[j, :n] = w[0, k - n:]
        cs, src = rt.copy_stream, es.st.buf
        for i, e in enumerate(ids[0, k - n:].tolist()):  # (a hop's host work: nothing built, one call a copy)
            d = self._slots.get((i, eb))
            if d is None:  # (layers of other quant types: other widths)
                d = self._slots[(i, eb)] = rt.rows_copy(buf[0, i], es.n_max * eb, src, base, pitch, eb, 3)
            rt.issue_copy(rt.retarget(d, src, base + e * eb, pitch), cs)
        self.rt.write_value(self.box.flag_address(2, j), 1, cs)
        self.experts_computed += n
        take = np.zeros(ids.shape, dtype=bool)
        take[0, k - n:] = True
        return take
