"""The device's share of a host-expert decode step replayed as one graph (--moe-share N with
core/hop_replay.py): of each token's routed experts the device computes the last N itself while the
CPU computes the others, so the two read host memory at once (the CPU's reads and the copy engine's
add up: ~100 + 55 GB/s measured on the H200's host, tools/gpu_notes.md).

The device routes each hop itself (the ids and weights are posted to the host with x). Where the
arena's offsets allow (expert_fetch.usable), a kernel then reads the last N routed experts' gate, up
and down rows out of the pinned arena into the share slot (zero-copy reads over PCIe) and the expert
kernels (moe_kernels.decode) run on the slot: nothing of the share is the host's. Else (the fake
device of the tests, odd offsets) the host, once it has read the posted ids: writes the N weights into
pinned memory, enqueues one 2-D copy per expert into the slot on its copy stream, then raises the
hop's shared flag on that stream; the graph waits for that flag, copies the weights up and runs the
kernels. Either way their sum meets the CPU's answer. The slot is reused by every layer: the next
hop's copies come after this hop's kernels (stream order, or the next post).

Its operands (arena offsets, the slot, the kernels' views) are ExpertShare's (the segment path's share).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import expert_fetch
from . import moe_kernels as mk

FETCH = os.environ.get("LSTREAM_SHARE_FETCH") != "0"  # 0: the host's copies (to compare)


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
        self.layers: list = [None] * box.n  # hop -> (experts taken, ExpertShare.layer's operands, fetched) or None
        self.experts_computed = 0

    def _plan(self, node):
        """(experts the device takes, ExpertShare.layer's operands, fetched by the kernel) for node's
        layer, or None when it cannot be shared."""
        k = node.params["top_k"]
        if len(node.inputs) != 2:
            return None
        if self.be._share is None:  # (the segment path's share: its slot holds a token's top_k experts)
            from .expert_share import ExpertShare
            self.be._share = ExpertShare(self.be, self.be._expert_streamer(), k)
        es = self.be._share
        lay = es.layer(node) if es.n_max >= k else None
        n = min(share_count(self.n_share, k), self._w_dev.shape[1])
        if lay is None or n <= 0:
            return None
        base, pitch, eb, buf, _ = lay
        return n, lay, FETCH and expert_fetch.usable(es.st.buf, buf, base, pitch, eb)

    def device(self, j: int, node, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
        """Inside the capture: hop j's shared experts' weighted sum (1, dim) fp32, or None when the
        layer cannot be shared. ids, w: the device's routing (1, top_k), by decreasing weight: the
        device takes the last n."""
        plan = self._plan(node) if x.shape[0] == 1 else None
        self.layers[j] = plan
        if plan is None:
            return None
        n, lay, fetched = plan
        if fetched:
            return self._fetched(node, x, ids, w, n, lay)
        self.rt.wait_value(self.box.flag_address(2, j), 1, self.rt.current_stream())
        wd = self._w_dev[j:j + 1, :n]
        wd.copy_(self._w_pin[j:j + 1, :n], non_blocking=True)
        ex = lay[4]
        return mk.decode(x, self._ids[:, :n], wd, ex[0], ex[2], up=ex[1])

    def warm(self, node, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """Eagerly, before the capture: the fetch and expert kernels of node's layer compiled (the
        capture then only records them)."""
        plan = self._plan(node) if x.shape[0] == 1 else None
        if plan is not None and plan[2]:
            self._fetched(node, x, ids, w, plan[0], plan[1])

    def _fetched(self, node, x, ids, w, n: int, lay) -> torch.Tensor:
        base, pitch, eb, buf, ex = lay
        k = ids.shape[1]
        expert_fetch.fetch(self.be._share.st.buf, ids, k - n, n, buf, base, pitch, eb)
        return mk.decode(x, self._ids[:, :n], w[:, k - n:], ex[0], ex[2], up=ex[1])

    def issue(self, j: int, ids: np.ndarray, w: np.ndarray) -> np.ndarray | None:
        """On the host, once hop j's routing is read: the mask of the pairs the device takes (the CPU
        skips them), or None (a layer not shared); where the device does not fetch them itself, their
        copies and the shared flag enqueued first."""
        if self.layers[j] is None:
            return None
        n, (base, pitch, eb, buf, _), fetched = self.layers[j]
        k = ids.shape[1]
        if not fetched:
            rt, es = self.rt, self.be._share
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
