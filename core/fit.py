"""Fit before load: what -ngl, the K/V cache for -c, the compute buffers and the streaming ring need
on the device, and what pinned host memory streaming needs, against what is free. Pure: the
residency map's entries and numbers in, a decision out (no torch, nothing allocated).

Device bytes for -ngl k (the layers placed as ResidencyMap.assign places them):
    resident 2-D weights of the device layers (a tied head counted again when apart from the embedding)
  + every 1-D tensor (norms, biases), which the device backend keeps as float32
  + K/V of the device layers (kv_bytes_per_layer each)
  + the streaming ring: n_slots x the largest streamed layer (when any layer is streamed)
  + compute buffers (passed in; estimate_compute_bytes gives one)
Pinned host bytes: the streamed layers' weights (one staging arena) + the host layers' K/V.
Experts (3-D tensors): resident with their layer unless --n-cpu-moe / --cpu-moe or an -ot pattern
keeps them in host memory; host experts the device may upload (expert by expert, per ubatch) need
EXPERT_LAYER_SLOTS layers' worth of device slots (core/expert_streaming.py) and are pinned. A MoE
model that does not fit keeps more layers' experts on the host before it lowers -ngl (as llama.cpp's
fit raises --n-cpu-moe first): the attention and shared weights stay on the device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from .errors import LStreamError
from .expert_streaming import EXPERT_LAYER_SLOTS

GiB = 1 << 30
MiB = 1 << 20
ALIGN = 256  # the streaming arena aligns each tensor (core/streaming.py)
DEFAULT_RESERVE = 256 * MiB  # left free for the CUDA context's own growth, cuBLAS workspaces, fragmentation


class FitError(LStreamError):
    """The model does not fit on the device (with --no-fit, or not even with -ngl 0)."""


def fmt_bytes(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Needs:
    ngl: int
    weights: int = 0
    small: int = 0
    kv: int = 0
    slots: int = 0
    compute: int = 0
    pinned: int = 0
    experts: int = 0  # device slots for host experts uploaded per ubatch
    n_cpu_moe: int = 0  # layers (from the first) whose experts stay in host memory

    @property
    def device(self) -> int:
        return self.weights + self.small + self.kv + self.slots + self.compute + self.experts


@dataclass
class FitResult:
    ngl: int  # the -ngl to use
    requested: int
    needs: Needs
    free_device: int
    note: str | None = None  # one line when -ngl was lowered
    warnings: list[str] = field(default_factory=list)
    n_cpu_moe: int = 0  # --n-cpu-moe to use (raised to fit a MoE model)


def on_device(layer: int, n_layer: int, ngl: int) -> bool:
    """ResidencyMap.assign's rule: the last ngl blocks, and the output layer once ngl > n_layer."""
    return (0 <= layer < n_layer and layer >= n_layer - ngl) or (layer == n_layer and ngl > n_layer)


def needs(entries: Iterable, n_layer: int, ngl: int, kv_bytes_per_layer: int, host_kv_bytes_per_layer: int = 0,
          compute_bytes: int = 0, n_slots: int = 3, streaming: bool = True, n_cpu_moe: int = 0,
          host_patterns: Iterable[str] = ()) -> Needs:
    """entries: objects with name, layer, shape, nbytes, alias_of (core.residency.TensorEntry).
    host_patterns: -ot regexes of tensors kept in host memory."""
    entries = list(entries)
    by_name = {e.name: e for e in entries}
    n = Needs(ngl=ngl, compute=compute_bytes, n_cpu_moe=n_cpu_moe)
    kept = [re.compile(p) for p in host_patterns]
    streamed: dict[int, int] = {}
    host_experts: dict[int, int] = {}
    for e in entries:
        vector = len(e.shape) == 1 or (len(e.shape) == 2 and e.shape[0] == 1)
        if vector:
            if e.alias_of is None:
                count = 1
                for d in e.shape:
                    count *= d
                n.small += 4 * count
            continue
        kept_here = any(rx.search(e.name) for rx in kept)
        if len(e.shape) == 3:  # experts: with their layer, unless --n-cpu-moe or -ot keeps them on the host
            if on_device(e.layer, n_layer, ngl) and e.layer >= n_cpu_moe and not kept_here:
                n.weights += e.nbytes
            else:
                host_experts[e.layer] = _align(host_experts.get(e.layer, 0) + e.nbytes)
            continue
        if on_device(e.layer, n_layer, ngl) and not kept_here:
            src = by_name.get(e.alias_of) if e.alias_of else None
            if src is None or not on_device(src.layer, n_layer, ngl):
                n.weights += e.nbytes
        elif e.name != "token_embd.weight":
            streamed[e.layer] = _align(streamed.get(e.layer, 0) + e.nbytes)
    device_blocks = sum(on_device(il, n_layer, ngl) for il in range(n_layer))
    n.kv = device_blocks * kv_bytes_per_layer
    if streaming and streamed:
        n.slots = n_slots * max(streamed.values())
        n.pinned = sum(streamed.values()) + (n_layer - device_blocks) * host_kv_bytes_per_layer
    if streaming and host_experts:
        n.experts = EXPERT_LAYER_SLOTS * max(host_experts.values())
        n.pinned += sum(host_experts.values())
    return n


def fit(entries: Iterable, n_layer: int, ngl: int, free_device: int, kv_bytes_per_layer: int,
        host_kv_bytes_per_layer: int = 0, compute_bytes: int = 0, n_slots: int = 3, streaming: bool = True,
        pinnable_host: int | None = None, reserve: int = DEFAULT_RESERVE, no_fit: bool = False,
        n_cpu_moe: int = 0, host_patterns: Iterable[str] = ()) -> FitResult:
    """The largest -ngl up to the requested one whose device bytes fit in free_device - reserve (a
    MoE model first keeps more layers' experts in host memory: the smallest --n-cpu-moe that fits)."""
    entries = list(entries)
    ngl_max = min(max(ngl, 0), n_layer + 1)
    avail = free_device - reserve
    args = dict(kv_bytes_per_layer=kv_bytes_per_layer, host_kv_bytes_per_layer=host_kv_bytes_per_layer,
                compute_bytes=compute_bytes, n_slots=n_slots, streaming=streaming, host_patterns=tuple(host_patterns))
    want = needs(entries, n_layer, ngl_max, n_cpu_moe=n_cpu_moe, **args)
    result = None
    if want.device <= avail:
        result = FitResult(ngl, ngl, want, free_device, n_cpu_moe=n_cpu_moe)
    elif no_fit:
        raise FitError(f"-ngl {ngl} needs {fmt_bytes(want.device)} on the device, {fmt_bytes(free_device)} free "
                       f"(--no-fit: -ngl is not lowered; lower -ngl or -c)")
    else:
        moe = any(len(e.shape) == 3 for e in entries)
        tries = [(ngl_max, m) for m in range(n_cpu_moe + 1, n_layer + 1)] if moe else []
        tries += [(k, n_layer if moe else n_cpu_moe) for k in range(ngl_max - 1, -1, -1)]
        for k, m in tries:
            n = needs(entries, n_layer, k, n_cpu_moe=m, **args)
            if n.device <= avail:
                how = f"using -ngl {k}" if k != ngl_max else f"experts of the first {m} layers in host memory " \
                                                             f"(--n-cpu-moe {m})"
                result = FitResult(k, ngl, n, free_device, n_cpu_moe=m, note=f"-ngl {ngl} needs {fmt_bytes(want.device)}, "
                                                                         f"{fmt_bytes(free_device)} free: {how}")
                break
        if result is None:
            n = needs(entries, n_layer, 0, **args)
            raise FitError(f"even -ngl 0 needs {fmt_bytes(n.device)} on the device (streaming ring "
                           f"{fmt_bytes(n.slots)}, compute buffers {fmt_bytes(n.compute)}), "
                           f"{fmt_bytes(free_device)} free: lower -c or -ub, or run without a GPU")
    if pinnable_host is not None and result.needs.pinned > pinnable_host:
        result.warnings.append(f"streaming wants {fmt_bytes(result.needs.pinned)} of pinned host memory, "
                               f"{fmt_bytes(pinnable_host)} available: copies fall back to pageable memory")
    return result


def estimate_compute_bytes(cfg, n_ubatch: int, n_ctx: int, largest_weight_values: int, dtype_bytes: int = 2) -> int:
    """Device compute buffers for one ubatch: the dequantization scratch (the largest weight in the
    compute dtype), the activations of one layer, the attention scores and the logits."""
    act = n_ubatch * (4 * cfg.n_embd * 4 + 3 * cfg.n_ff * dtype_bytes
                      + (cfg.n_head + 2 * cfg.n_head_kv) * cfg.head_dim * dtype_bytes)
    scores = cfg.n_head * n_ubatch * n_ctx * 4
    logits = n_ubatch * cfg.vocab_size * 4
    return largest_weight_values * dtype_bytes + act + scores + logits


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo (what pinning can take at most), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fit_model(residency, cfg, ngl: int, n_ctx: int, n_ubatch: int, free_device: int, n_slots: int = 3,
              streaming: bool = True, no_fit: bool = False, dtype_bytes: int = 2, n_cpu_moe: int = 0,
              host_patterns: Iterable[str] = ()) -> FitResult:
    """fit() with the K/V and compute sizes of a model (device K/V in the compute dtype, host K/V float32)."""
    entries = list(residency)
    kv_values = 2 * n_ctx * cfg.n_head_kv * cfg.head_dim
    largest = max((e.shape[0] * e.shape[-1] for e in entries if len(e.shape) == 2), default=0)
    return fit(entries, cfg.n_layer, ngl, free_device, kv_bytes_per_layer=kv_values * dtype_bytes,
               host_kv_bytes_per_layer=kv_values * 4,
               compute_bytes=estimate_compute_bytes(cfg, n_ubatch, n_ctx, largest, dtype_bytes),
               n_slots=n_slots, streaming=streaming, pinnable_host=host_available(), no_fit=no_fit,
               n_cpu_moe=n_cpu_moe, host_patterns=host_patterns)
