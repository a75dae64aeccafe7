"""Programmatic dependent launch (Hopper and later) for the kernels of a decode step.

A captured resident decode step is ~336 small kernels and the GPU idles ~2 us between two of them
(the next grid's launch and ramp-up: 0.7 ms of a 2.74 ms step on the H200). Launched with PDL, a
kernel's CTAs are scheduled while the previous kernel's last wave still runs, then block in
griddepcontrol.wait until it has finished and its writes are visible. So every kernel launched
with kw()'s flags calls enter() (Gluon) or tl_enter() (Triton) before it touches memory; kernels
launched without them (torch ops) keep full stream order. LSTREAM_PDL=0 turns it off.
"""
from __future__ import annotations

import os

import torch

_ON: dict[int, bool] = {}

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def enter():
        """Let the next PDL grid be scheduled, then wait for the previous grid (and its writes)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
except ImportError:  # pragma: no cover - depends on the install
    enter = None

try:
    import triton
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def tl_enter():
        gdc_launch_dependents()
        gdc_wait()
except ImportError:  # pragma: no cover
    tl_enter = None


def enabled(t: torch.Tensor) -> bool:
    if not t.is_cuda or enter is None or tl_enter is None or os.environ.get("LSTREAM_PDL", "1") == "0":
        return False
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if dev not in _ON:
        _ON[dev] = torch.cuda.get_device_capability(dev)[0] >= 9
    return _ON[dev]


def kw(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel with a PDL constexpr: on (with the launch attribute) or off."""
    return dict(PDL=True, launch_pdl=True) if enabled(t) else dict(PDL=False)
