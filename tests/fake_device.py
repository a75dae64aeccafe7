"""A test-only device backend: backends/cuda.py's code on torch CPU tensors.

Streams and events are simulated: a stream may be *deferred*, holding its copies in a queue that
runs only when another stream waits on an event recorded after them (or on synchronize). A copy
that nobody waited for therefore has not happened yet, so a compute op that forgot its wait reads
stale slot bytes and the test's numbers go wrong, exactly as on a GPU. Every record/wait/copy is
logged for ordering assertions, and device allocations are counted (VRAM must stay flat).
"""
from __future__ import annotations

import ctypes
import itertools
import time
import warnings

import numpy as np
import torch

from lstream.backends.cuda import CUDABackend

_ids = itertools.count()


class FakeEvent:
    def __init__(self, rt, timing=False):
        self.rt, self.id, self.stream, self.pos, self.recorded = rt, next(_ids), None, 0, False

    def record(self, stream=None):
        stream = stream or self.rt.compute_stream
        self.stream, self.pos, self.recorded = stream, len(stream.queue) + stream.done, True
        self.rt.log.append(("record", stream.name, self.id))

    def synchronize(self):
        if self.stream is not None:
            self.stream.run_until(self.pos)

    def query(self):
        return self.stream is None or self.stream.done >= self.pos

    def elapsed_time(self, other) -> float:
        return 0.0


class FakeStream:
    def __init__(self, rt, name, deferred=False):
        self.rt, self.name, self.deferred = rt, name, deferred
        self.queue: list = []
        self.done = 0  # ops executed so far

    def run_until(self, pos):
        while self.done < pos and self.queue:
            self.queue.pop(0)()
            self.done += 1

    def wait_event(self, ev):
        self.rt.log.append(("wait", self.name, ev.id, ev.recorded))
        if ev.recorded:
            ev.synchronize()  # the waiting stream's later work sees everything before the event

    def synchronize(self):
        self.run_until(self.done + len(self.queue))

    def submit(self, fn):
        if self.deferred:
            self.queue.append(fn)
        else:
            fn()
            self.done += 1


class FakeRuntime:
    def __init__(self, deferred_copies: bool = True, pin_ok: bool = True, capacity: int = 1 << 40):
        self.device = torch.device("cpu")
        self.capacity = capacity  # pretend VRAM size, for fit-before-load
        self.log: list[tuple] = []
        self.compute_stream = FakeStream(self, "compute")
        self.copy_stream = FakeStream(self, "copy", deferred_copies)
        self.kv_stream = FakeStream(self, "kv", deferred_copies)
        self.pin_ok = pin_ok
        self.device_bytes = 0
        self.pinned_bytes = 0

    def new_event(self, timing=False):
        return FakeEvent(self, timing)

    def alloc_host(self, nbytes):
        if self.pin_ok:
            self.pinned_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8), self.pin_ok

    def alloc_device(self, nbytes):
        self.device_bytes += nbytes
        # poisoned, so reading a slot before its copy ran gives garbage, not zeros
        return torch.full((nbytes,), 0xFF, dtype=torch.uint8)

    @staticmethod
    def host_view(a):
        with warnings.catch_warnings():  # read-only memory maps: we only ever read through the view
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(a).reshape(-1).view(np.uint8))

    @staticmethod
    def as_array(buf, like):
        return buf.numpy().view(np.asarray(like).dtype).reshape(np.shape(like))

    def copy(self, dst, src, stream):
        self.log.append(("copy", stream.name, dst.data_ptr(), dst.numel()))
        stream.submit(lambda: dst.copy_(src))

    def copy_2d(self, dst, src, offset, pitch, width, height, stream):
        self.log.append(("copy", stream.name, dst.data_ptr(), dst.numel()))
        stream.submit(lambda: dst.view(height, width).copy_(src.as_strided((height, width), (pitch, 1), offset)))

    def copy_rows(self, dst, dst_pitch, src, offset, pitch, width, height, stream):
        self.log.append(("copy", stream.name, dst.data_ptr(), width * height))
        stream.submit(lambda: dst.as_strided((height, width), (dst_pitch, 1)).copy_(
            src.as_strided((height, width), (pitch, 1), offset)))

    def current_stream(self):
        return self.compute_stream

    # stream memory operations: host words read and written in place (a wait spins in the calling thread)
    @staticmethod
    def device_address(host):
        return host.data_ptr()

    def write_value(self, addr, value, stream):
        self.log.append(("write value", stream.name, addr, value))
        stream.submit(lambda: setattr(ctypes.c_int32.from_address(addr), "value", value))

    def wait_value(self, addr, value, stream, timeout: float = 60.0):
        self.log.append(("wait value", stream.name, addr, value))

        def wait():
            word, t0 = ctypes.c_int32.from_address(addr), time.perf_counter()
            while word.value < value:
                for s in (self.copy_stream, self.kv_stream):  # (what another thread queued there runs here)
                    s.synchronize()
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"fake wait_value: {addr:#x} stayed below {value}")
                time.sleep(0)
        stream.submit(wait)

    @staticmethod
    def rows_copy(dst, dst_pitch, src, offset, pitch, width, height):
        if offset + (height - 1) * pitch + width > src.numel():
            raise ValueError(f"2-D copy of {height} x {width} bytes from {offset}: src has {src.numel()}")
        return (dst, dst_pitch, src, offset, pitch, width, height)

    @classmethod
    def retarget(cls, desc, src, offset, pitch):
        dst, dst_pitch, _, _, _, width, height = desc
        return cls.rows_copy(dst, dst_pitch, src, offset, pitch, width, height)

    def issue_copy(self, desc, stream):
        self.copy_rows(*desc, stream)

    def synchronize(self):
        for s in (self.compute_stream, self.copy_stream, self.kv_stream):
            s.synchronize()

    def memory_allocated(self) -> int:
        return self.device_bytes

    def free_memory(self) -> int:
        return self.capacity - self.device_bytes


class FakeDeviceBackend(CUDABackend):
    """CUDABackend on the fake runtime; float32 compute so it matches the CPU backend closely."""
    name = "fake"
    real_time = False  # simulated streams: nothing to tune a policy on

    def __init__(self, policy=None, deferred_copies: bool = True, dtype="fp32", n_slots: int = 3,
                 speculate: bool = False, pin_ok: bool = True, expert_cache_gib: float = 0.0):
        super().__init__(policy=policy, runtime=FakeRuntime(deferred_copies, pin_ok), dtype=dtype,
                         n_slots=n_slots, use_triton=False, speculate=speculate, repack_resident=True,
                         expert_cache_gib=expert_cache_gib)

    def describe(self) -> str:
        return f"fake device (CPU tensors, {self.dtype})"
