"""Which backends this machine has, and building them: the API and the CLI ask here.

The one rule for GPU requests on a machine without a GPU (`choose_device`), used by every command
and the API alike:
- layers asked for the GPU (-ngl N / n_gpu_layers=N, N > 0): one warning line, and the model runs
  on the CPU (as llama.cpp does with -ngl);
- an explicit placement that cannot be honoured (-ot REGEX=cuda, device="cuda", or -ngl N with
  --no-fit, which asks to fail rather than run fewer layers on the GPU): one error line
  (NoDeviceError), nothing runs, since running on the CPU would mislead."""
from __future__ import annotations

import glob
import os
import re
import sys
import warnings
from dataclasses import dataclass

from ..core.errors import LStreamError

DEVICE_NAME = re.compile(r"(?i)^(cuda|gpu)(:?\d+)?$")  # cuda, cuda0, CUDA0 (llama.cpp's), cuda:1
HOST_NAMES = ("cpu", "host")


class NoDeviceError(LStreamError):
    """A device was asked for explicitly and this machine has none to honour it."""


class NoGPUWarning(UserWarning):
    """GPU layers were asked for and there is no GPU: the model runs on the CPU."""


# How each entry point names the requests, for the messages.
API_NAMES = {"ngl": "n_gpu_layers={}", "ot": "override {}", "no_fit": "no_fit=True", "device": "device={!r}"}
CLI_NAMES = {"ngl": "-ngl {}", "ot": "-ot {}", "no_fit": "--no-fit", "device": "device {}"}


def gpu_status() -> tuple[bool, str]:
    """(is there a usable CUDA device, why not in a few words)."""
    # no GPU device node on Linux (NVIDIA, ROCm, WSL): no CUDA, and no need to import torch (~1.2 s)
    if sys.platform == "linux" and not (glob.glob("/dev/nvidia*") or glob.glob("/dev/kfd") or glob.glob("/dev/dxg")):
        return False, "no GPU device found"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.backends.cuda.is_built() and getattr(torch.version, "hip", None) is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    try:
        if torch.cuda.is_available():
            return True, ""
    except Exception as e:  # noqa: BLE001 - a broken driver is one more way of having no GPU
        return False, f"CUDA unusable ({type(e).__name__})"
    return False, "torch found no CUDA device"


def cuda_available() -> bool:
    return gpu_status()[0]


def cpu_count() -> int:
    """Logical CPUs this process may use (numba's thread pool has at most this many threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def is_host(device: str) -> bool:
    return device.strip().lower() in HOST_NAMES


def check_device_name(device: str, what: str = "device") -> None:
    if not isinstance(device, str) or not (is_host(device) or DEVICE_NAME.match(device.strip())):
        raise ValueError(f"{what}: unknown device {device!r}, expected cpu or cuda (cuda0, cuda:1 ...)")


def torch_device(device: str) -> str:
    """cuda, cuda0, CUDA0, cuda:1, gpu -> torch's spelling (cuda, cuda:0, cuda:1)."""
    m = DEVICE_NAME.match(device.strip())
    return "cuda" + (f":{m[2].lstrip(':')}" if m and m[2] else "")


@dataclass(frozen=True)
class DeviceChoice:
    device: str | None  # the device backend to build ("cuda"); None: the CPU only
    n_gpu_layers: int  # what the residency map gets
    overrides: tuple  # (pattern, device) pairs the residency map gets
    warning: str | None = None  # one line: what was asked for and is not done here
    gpu: bool = True  # whether this machine has a GPU
    why: str = ""  # why not, when it has none


def choose_device(n_gpu_layers: int = 0, overrides=(), device: str | None = "auto", no_fit: bool = False,
                  names: dict | None = None, available: tuple[bool, str] | None = None) -> DeviceChoice:
    """The device a model gets, from what was asked: device "auto" (a GPU whenever there is one: -ngl 0
    still streams prefill), "cuda", "cpu" or None (a GPU only for n_gpu_layers > 0 or overrides).
    Without a GPU, see the module's rule. `available`: (gpu, why), for tests."""
    names = names or API_NAMES
    overrides = tuple((p, d) for p, d in overrides)
    for _, d in overrides:
        check_device_name(d, names["ot"].format("").strip())
    if n_gpu_layers < 0:
        raise ValueError(f"{names['ngl'].format(n_gpu_layers)}: expected 0 or more")
    if device not in (None, "auto"):
        check_device_name(device)
    gpu, why = available if available is not None else gpu_status()
    on_device = [f"{p}={d}" for p, d in overrides if not is_host(d)]
    wants = device not in (None, "auto") and not is_host(device)
    if gpu:
        if device is not None and is_host(device):
            if n_gpu_layers > 0 or on_device:
                raise ValueError(f"{names['device'].format(device)} with GPU layers or tensors asked for")
            return DeviceChoice(None, 0, overrides)
        use = torch_device(device) if wants else ("cuda" if device == "auto" or n_gpu_layers > 0 or on_device else None)
        return DeviceChoice(use, n_gpu_layers, overrides)
    if wants:
        raise NoDeviceError(f"no GPU here ({why}): {names['device'].format(device)} cannot be honoured")
    if on_device:
        raise NoDeviceError(f"no GPU here ({why}): {names['ot'].format(on_device[0])} places tensors on a "
                            "device this machine does not have (use =cpu, or leave it out)")
    if n_gpu_layers > 0 and no_fit:
        raise NoDeviceError(f"no GPU here ({why}): {names['ngl'].format(n_gpu_layers)} with {names['no_fit']} "
                            "cannot be honoured (without it, every layer runs on the CPU)")
    warning = None
    if n_gpu_layers > 0:
        warning = f"no GPU here ({why}): {names['ngl'].format(n_gpu_layers)} ignored, every layer runs on the CPU"
    return DeviceChoice(None, 0, overrides, warning, gpu=False, why=why)


def warn_no_gpu(message: str) -> None:
    """The API's form of the warning: warnings.warn, attributed to the caller's line outside the
    library (lstream.load(...) or Model(...) in the user's code)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inside = tuple(os.path.join(root, d) + os.sep for d in ("backends", "core", "loaders", "cli")) + \
        (os.path.join(root, "api.py"),)
    level, f = 2, sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(inside):
        level, f = level + 1, f.f_back
    warnings.warn(message, NoGPUWarning, stacklevel=level)


def require_gpu(what: str) -> None:
    """For features that only exist with a GPU (the cost model's calibration): one error line without."""
    gpu, why = gpu_status()
    if not gpu:
        raise NoDeviceError(f"no GPU here ({why}): {what} needs one")


def make_cpu_backend(options):
    from .cpu import CPUBackend
    return CPUBackend(options.n_threads, options)


def make_device_backend(device: str, policy, options):
    """The CUDA backend, imported only when asked for (torch.cuda is not needed otherwise)."""
    from .cuda import CUDABackend
    return CUDABackend(policy=policy, device=device, cuda_graphs=options.cuda_graphs,
                       expert_cache_gib=options.expert_cache_gib, moe_share=options.moe_share)
