"""The CUDA backend (backend.py) and its kernels: dequantization (dequant.py), the quantized
matrix-vector product of decode (gemv.py), RMS norm and RoPE (norm_rope.py), attention
(attention.py), static steps and CUDA graphs (graphs.py), streams and copies (runtime.py)."""
from .attention import DeviceKV
from .backend import CUDABackend
from .runtime import CudaRuntime

__all__ = ["CUDABackend", "CudaRuntime", "DeviceKV"]
