"""The CPU backend: numba kernels on the quantized weights (backend.py), by what they compute."""
from .backend import CPUBackend, HostKV, physical_cores

__all__ = ["CPUBackend", "HostKV", "physical_cores"]
