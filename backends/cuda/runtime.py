"""Streams, events, pinned host memory and async copies on a real CUDA device: everything
device-specific the CUDA backend does goes through one of these, so tests/fake_device.py runs the
backend's exact code on CPU tensors."""
from __future__ import annotations

import warnings

import numpy as np
import torch


class CudaRuntime:
    """Streams, events, pinned host memory and async copies on a real CUDA device."""

    def __init__(self, device: str = "cuda"):
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        self.compute_stream = torch.cuda.current_stream(self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.kv_stream = torch.cuda.Stream(self.device)

    def new_event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def alloc_host(self, nbytes: int):
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), True
        except RuntimeError:
            return torch.empty(nbytes, dtype=torch.uint8), False

    def alloc_device(self, nbytes: int):
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @staticmethod
    def host_view(a) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only memory maps: we only ever read through the view
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(a).reshape(-1).view(np.uint8))

    @staticmethod
    def as_array(buf: torch.Tensor, like) -> np.ndarray:
        return buf.numpy().view(np.asarray(like).dtype).reshape(np.shape(like))

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def free_memory(self) -> int:
        """Free device bytes now, plus what torch's allocator holds cached (reusable by us)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
