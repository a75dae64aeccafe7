"""Streams, events, pinned host memory and async copies on a real CUDA device: everything
device-specific the CUDA backend does goes through one of these, so tests/fake_device.py runs the
backend's exact code on CPU tensors."""
from __future__ import annotations

import ctypes
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

    def copy_2d(self, dst: torch.Tensor, src: torch.Tensor, offset: int, pitch: int, width: int, height: int,
                stream) -> None:
        """Rows of `width` bytes, `pitch` apart in pinned `src` from `offset`, packed into `dst`."""
        _copy_2d(dst, src, offset, pitch, width, height, stream)

    def copy_rows(self, dst: torch.Tensor, dst_pitch: int, src: torch.Tensor, offset: int, pitch: int, width: int,
                  height: int, stream) -> None:
        """Rows `pitch` apart in pinned `src` to rows `dst_pitch` apart from dst's first byte: one DMA."""
        copy_rows(dst, dst_pitch, src, offset, pitch, width, height, stream)

    @staticmethod
    def rows_copy(dst: torch.Tensor, dst_pitch: int, src: torch.Tensor, offset: int, pitch: int, width: int,
                  height: int):
        """copy_rows' DMA as a descriptor checked and built once, issued by issue_copy as often as it
        recurs (a decode hop's shared experts: ~20 us of host time a hop saved)."""
        if offset + (height - 1) * pitch + width > src.numel():
            raise ValueError(f"2-D copy of {height} x {width} bytes from {offset}: src has {src.numel()}")
        return _desc(dst.data_ptr(), dst_pitch, src.data_ptr() + offset, pitch, width, height)

    @staticmethod
    def retarget(desc, src: torch.Tensor, offset: int, pitch: int):
        """rows_copy's descriptor read from byte `offset` of src, rows `pitch` apart, instead: changed in
        place (the driver reads it when a copy is issued), so a hop's copies build nothing."""
        if offset + (desc.Height - 1) * pitch + desc.WidthInBytes > src.numel():
            raise ValueError(f"2-D copy of {desc.Height} x {desc.WidthInBytes} bytes from {offset}: src has {src.numel()}")
        desc.srcHost, desc.srcPitch = src.data_ptr() + offset, pitch
        return desc

    @staticmethod
    def issue_copy(desc, stream) -> None:
        _issue(desc, stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def current_stream(self):
        """The stream work is enqueued on now (a graph's capture stream while capturing)."""
        return torch.cuda.current_stream(self.device)

    # stream memory operations on pinned host words (a decode step's expert hops, core/hop_mailbox.py)
    @staticmethod
    def device_address(host: torch.Tensor) -> int:
        """The device's address of pinned host memory."""
        ptr = ctypes.c_uint64()
        _check(_drv().cuMemHostGetDevicePointer_v2(ctypes.byref(ptr), ctypes.c_void_p(host.data_ptr()), 0),
               "cuMemHostGetDevicePointer")
        return ptr.value

    @staticmethod
    def write_value(addr: int, value: int, stream) -> None:
        """The 32-bit word at `addr` set to value in stream order, after a fence (the writes before
        it are visible first)."""
        _check(_drv().write32(ctypes.c_void_p(stream.cuda_stream), addr, value, 0), "cuStreamWriteValue32")

    @staticmethod
    def wait_value(addr: int, value: int, stream) -> None:
        """The stream waits until the 32-bit word at `addr` is >= value."""
        _check(_drv().wait32(ctypes.c_void_p(stream.cuda_stream), addr, value, 0), "cuStreamWaitValue32")

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def free_memory(self) -> int:
        """Free device bytes now, plus what torch's allocator holds cached (reusable by us)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)


class _Memcpy2D(ctypes.Structure):  # CUDA_MEMCPY2D (cuda.h)
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t), ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t),
                ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64),
                ("dstArray", ctypes.c_void_p), ("dstPitch", ctypes.c_size_t), ("WidthInBytes", ctypes.c_size_t),
                ("Height", ctypes.c_size_t)]


_driver = None
_descs: dict[tuple, _Memcpy2D] = {}  # the same copies come back every decode step (ffn_share's slots)


def _copy_2d(dst: torch.Tensor, src: torch.Tensor, offset: int, pitch: int, width: int, height: int, stream) -> None:
    """height rows of `width` bytes, `pitch` apart from byte `offset` of pinned `src`, packed into
    device `dst`: one DMA (cuMemcpy2DAsync; torch has no strided host-to-device copy that stays async)."""
    key = (dst.data_ptr(), src.data_ptr() + offset, pitch, width, height)
    c = _descs.get(key)
    if c is None:
        if dst.numel() != width * height or offset + (height - 1) * pitch + width > src.numel():
            raise ValueError(f"2-D copy of {height} x {width} bytes: dst has {dst.numel()}, src {src.numel()}")
        c = _desc(key[0], width, key[1], pitch, width, height)
        if len(_descs) > 4096:  # (buffers freed and reallocated elsewhere: start again)
            _descs.clear()
        _descs[key] = c
    _issue(c, stream)


def copy_rows(dst: torch.Tensor, dst_pitch: int, src: torch.Tensor, offset: int, pitch: int, width: int,
              height: int, stream) -> None:
    """height rows of `width` bytes, `pitch` apart from byte `offset` of pinned `src`, to device rows
    `dst_pitch` apart from dst's first byte: one DMA (an expert's gate, up and down in one call)."""
    _issue(CudaRuntime.rows_copy(dst, dst_pitch, src, offset, pitch, width, height), stream)


def _desc(dst: int, dst_pitch: int, src: int, pitch: int, width: int, height: int) -> _Memcpy2D:
    """A pinned-host -> device 2-D copy's descriptor (memory types 1: host, 2: device)."""
    return _Memcpy2D(srcMemoryType=1, srcHost=src, srcPitch=pitch, dstMemoryType=2, dstDevice=dst,
                     dstPitch=dst_pitch, WidthInBytes=width, Height=height)


def _issue(c: _Memcpy2D, stream) -> None:
    _check(_drv().cuMemcpy2DAsync_v2(ctypes.byref(c), ctypes.c_void_p(stream.cuda_stream)), "cuMemcpy2DAsync")


def _drv():
    """libcuda, the few driver calls torch does not expose given their argument types."""
    global _driver
    if _driver is None:
        d = ctypes.CDLL("libcuda.so.1")
        d.cuMemcpy2DAsync_v2.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
        d.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        for short, name in (("write32", "cuStreamWriteValue32"), ("wait32", "cuStreamWaitValue32")):
            fn = getattr(d, name + "_v2", None) or getattr(d, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            setattr(d, short, fn)
        _driver = d
    return _driver


def _check(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"{what} failed with CUDA error {err}")
