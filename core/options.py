"""Run options: what used to be environment switches, as one object passed down from the API and
the CLI to the backends. The environment variables remain as documented overrides, read here only
(`Options.from_env`), never at import time."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

BLK_CHOICES = ("default", "all", "none")
MOE_SHARE_AUTO = -1  # moe_share: half of a token's routed experts (backends/cuda/hop_share.share_count)
ACT8_AUTO_BYTES = 1 << 30  # host matmul weights from which cpu_act8=None means int8 activations

# variable -> (field, parser); docs/architecture.md and the README list them
ENV_OVERRIDES = {
    "LSTREAM_CPU_PROGRAM": ("cpu_programs", lambda s: s != "0"),
    "LSTREAM_CPU_BLK": ("cpu_blk", lambda s: s if s in BLK_CHOICES else "default"),
    "LSTREAM_NO_BLAS_PREFILL": ("blas_prefill", lambda s: s != "1"),
    "LSTREAM_ADAPTIVE_THREADS": ("adaptive_threads", lambda s: s == "1"),
    "LSTREAM_CPU_ACT8": ("cpu_act8", lambda s: {"1": True, "0": False}.get(s)),
    "LSTREAM_HOST_KV": ("host_kv_half", lambda s: s != "f32"),
    "LSTREAM_MOE_SHARE": ("moe_share", lambda s: int(s) if s.isdigit() else MOE_SHARE_AUTO),
}


@dataclass(frozen=True)
class Options:
    """n_threads: CPU threads (None: the physical cores this process may use).
    cpu_programs: run a decode step's CPU nodes as one compiled numba call (else op by op).
    cpu_blk: which quant types the CPU computes on their GGUF blocks in place: "default" (Q8_0),
      "all" (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) or "none" (every type repacked).
    blas_prefill: CPU prefill through dequantized tiles + OpenBLAS sgemm (else int16 kernels).
    adaptive_threads: decode steps time themselves and use n_threads or 1, whichever was faster
      lately (helps on a loaded 2-vCPU machine, hurts on a many-core host).
    cuda_graphs: replay resident decode steps from CUDA graphs (else run them eagerly).
    layer_major: a streamed prompt's ubatches pass each layer together (one weight pass).
    cpu_act8: the int kernels of Q4_0/Q4_1 weights ("nibw") quantize activations to int8 (vpmaddubsw,
      as llama.cpp's q8 activations; ~1.25x faster multi-token matmuls on Zen 1) instead of int16.
      None (default): int8 where the CPU's matmul weights reach ACT8_AUTO_BYTES (a decode that reads
      gigabytes per token is memory-bound, and int8's fewer instructions let the cores keep up:
      12.11 -> 14.08 t/s CPU-only on the H200's 16-core host, 8B Q4_0); int16 for smaller models.
    expert_cache_gib: VRAM (GiB) for the routed experts of host-expert layers in decode, least recently
      used evicted (--expert-cache; core/expert_cache.py); 0: none.
    moe_share: of a token's routed experts in a host-expert decode layer, how many the device copies
      from pinned memory and computes while the CPU computes the rest (backends/cuda/hop_share.py), in
      decode steps replayed as one graph; MOE_SHARE_AUTO (default): half of them (top_k // 2), 0: the
      CPU computes all. On the H200, 48 host-expert layers, 4 of 8 shared: 37.68 -> 46.00 t/s.
    host_kv_half: CPU decode from HALF_FROM cached tokens reads a float16 mirror of each host layer's
      K/V (backends/cpu/host_kv.py: half the bytes at depth); False: float32 at every depth."""
    n_threads: int | None = None
    cpu_programs: bool = True
    cpu_blk: str = "default"
    blas_prefill: bool = True
    adaptive_threads: bool = False
    cuda_graphs: bool = True
    layer_major: bool = True
    cpu_act8: bool | None = None
    expert_cache_gib: float = 0.0
    host_kv_half: bool = True
    moe_share: int = MOE_SHARE_AUTO

    def __post_init__(self):
        if self.cpu_blk not in BLK_CHOICES:
            raise ValueError(f"cpu_blk must be one of {', '.join(BLK_CHOICES)}, found {self.cpu_blk!r}")
        if self.expert_cache_gib < 0:
            raise ValueError(f"expert_cache_gib must be 0 or more, found {self.expert_cache_gib}")
        if self.moe_share < MOE_SHARE_AUTO:
            raise ValueError(f"moe_share must be 0 or more (or MOE_SHARE_AUTO), found {self.moe_share}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"n_threads must be at least 1, found {self.n_threads}")

    @classmethod
    def from_env(cls, environ=None, **given) -> "Options":
        """Defaults, then the LSTREAM_* overrides found in the environment, then `given` (None: not given)."""
        env = os.environ if environ is None else environ
        kw = {}
        for var, (name, parse) in ENV_OVERRIDES.items():
            if var in env:
                kw[name] = parse(env[var])
        names = {f.name for f in fields(cls)}
        for k, v in given.items():
            if k not in names:
                raise TypeError(f"unknown option {k!r}")
            if v is not None:
                kw[k] = v
        return cls(**kw)

    def with_(self, **kw) -> "Options":
        return replace(self, **kw)
