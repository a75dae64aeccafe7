"""The device's side of a decode step's expert hops (core/hop_mailbox.py has the protocol): inside a
captured step, `post` copies a hop's values into pinned memory and raises its flag with a stream
memory operation; `take` makes the stream wait for the host's answering flag and copies the answer
up. Each hop has its own pinned and device buffers, made at capture and kept with the graph."""
from __future__ import annotations

import torch

from ...core.hop_mailbox import HostMailbox


class DeviceMailbox(HostMailbox):
    def __init__(self, rt, device, n_hops: int):
        flags, pinned = rt.alloc_host(12 * n_hops)
        if not pinned:
            raise RuntimeError("expert hops need pinned host memory, and none could be allocated")
        super().__init__(flags.view(torch.int32).numpy())
        self.rt, self.device = rt, device
        self._flags = flags
        self._addr = rt.device_address(flags)
        self._bufs: list = [None] * n_hops  # hop -> (device stage, pinned down, pinned up, device up)

    def post(self, j: int, values: list) -> None:
        """Hop j's values (device tensors) into its pinned buffer as float32, then its flag."""
        shapes = [tuple(v.shape) for v in values]
        total = sum(v.numel() for v in values)
        if self._bufs[j] is None:
            down = self.rt.alloc_host(4 * total)[0].view(torch.float32)
            up = self.rt.alloc_host(4 * values[0].numel())[0].view(torch.float32).view(shapes[0])
            self._bufs[j] = (torch.empty(total, dtype=torch.float32, device=self.device), down, up,
                             torch.empty(shapes[0], dtype=torch.float32, device=self.device))
            self.down[j], self.up[j] = (down.numpy(), shapes), up.numpy()
        stage, down, _, _ = self._bufs[j]
        off = 0
        for v in values:  # one copy down instead of one per value
            stage[off:off + v.numel()].copy_(v.reshape(-1))
            off += v.numel()
        stream = self.rt.current_stream()
        down.copy_(stage, non_blocking=True)
        self.rt.write_value(self.flag_address(0, j), 1, stream)

    def flag_address(self, group: int, j: int) -> int:
        """The device address of hop j's flag in group 0 (posted), 1 (answered) or 2 (shared)."""
        return self._addr + 4 * (group * self.n + j)

    def take(self, j: int) -> torch.Tensor:
        """The stream waits for hop j's answer; returns it on the device (float32, x's shape)."""
        _, _, up, dev = self._bufs[j]
        self.rt.wait_value(self.flag_address(1, j), 1, self.rt.current_stream())
        dev.copy_(up, non_blocking=True)
        return dev
