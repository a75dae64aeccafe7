"""Which backends this machine has, and building them: the API and the CLI ask here."""
from __future__ import annotations

import glob
import sys


def cuda_available() -> bool:
    # no GPU device node on Linux (NVIDIA, ROCm, WSL): no CUDA, and no need to import torch (~1.2 s)
    if sys.platform == "linux" and not (glob.glob("/dev/nvidia*") or glob.glob("/dev/kfd") or glob.glob("/dev/dxg")):
        return False
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def make_cpu_backend(options):
    from .cpu import CPUBackend
    return CPUBackend(options.n_threads, options)


def make_device_backend(device: str, policy, options):
    """The CUDA backend, imported only when asked for (torch.cuda is not needed otherwise)."""
    from .cuda import CUDABackend
    return CUDABackend(policy=policy, device=device, cuda_graphs=options.cuda_graphs)
