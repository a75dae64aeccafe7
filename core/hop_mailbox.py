"""The host's side of a decode step's expert hops served while the step's graph runs
(core/hop_replay.py): per hop, the device posts its values (x and its routing: expert ids and weights)
into pinned memory and raises a flag; the host, spinning on that flag, computes the experts, writes the answer
into pinned memory and raises the answering flag the device waits on. No host launch, copy or
stream wait per hop: the whole step is one graph, and a hop costs the host a flag read and a write.

The flags are one int32 array in memory both sides see: [posted 0..n-1, answered 0..n-1, shared
0..n-1], all zero before each replay (the graph sets posted flags and waits for the others; a shared
flag is raised by the host's copy stream once the experts the device computes itself have landed,
backends/cuda/hop_share.py).
"""
from __future__ import annotations

import time

import numpy as np

TIMEOUT_S = 120.0  # a posted flag that never comes: the graph failed (its error surfaces at the sync)


class HopTimeout(RuntimeError):
    pass


class HostMailbox:
    def __init__(self, flags: np.ndarray):
        if flags.dtype != np.int32 or flags.ndim != 1 or len(flags) % 3:
            raise ValueError(f"hop flags: expected an int32 vector of 3 per hop, found {flags.dtype} {flags.shape}")
        self.flags = flags
        self.n = len(flags) // 3
        self.down: list = [None] * self.n  # hop -> (flat float32 array the device posts into, shapes)
        self.up: list = [None] * self.n  # hop -> float32 array the answer goes into

    def reset(self) -> None:
        """Before a replay, once the previous one has finished."""
        self.flags[:] = 0

    def wait_posted(self, j: int, timeout: float = TIMEOUT_S) -> list[np.ndarray]:
        """Hop j's posted values (views of its pinned buffer), once its flag is up."""
        f = self.flags
        if f[j] == 0:
            t0, spins = time.perf_counter(), 0
            while f[j] == 0:  # (a numpy read each turn: the device's write lands in host memory)
                spins += 1
                if spins & 0x3FFF == 0 and time.perf_counter() - t0 > timeout:
                    raise HopTimeout(f"expert hop {j}: the device posted nothing within {timeout:.0f} s")
        flat, shapes = self.down[j]
        out, off = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            out.append(flat[off:off + size].reshape(shape))
            off += size
        return out

    def answer(self, j: int, y: np.ndarray) -> None:
        # the answer's bytes before its flag: x86 keeps stores in program order (an ARM host would fence)
        self.up[j][...] = y
        self.flags[self.n + j] = 1

    def release(self) -> None:
        """Every answered and shared flag up: a graph whose hop failed on the host runs to its end (its values
        are discarded) instead of waiting forever."""
        self.flags[self.n:] = 1
