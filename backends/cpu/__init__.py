"""The CPU backend: numba kernels on the quantized weights (backend.py), by what they compute."""
from .kernel_cache import drop_stale

drop_stale()  # before any kernel module loads its cached machine code (kernel_cache.py says why)

from .backend import CPUBackend, HostKV, physical_cores  # noqa: E402

__all__ = ["CPUBackend", "HostKV", "physical_cores"]
