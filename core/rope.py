"""Rotary embedding frequencies, shared by every backend so they rotate identically."""
from __future__ import annotations

import math

import numpy as np


def inv_freq(base: float, n_rot: int, scaling: dict | None = None) -> np.ndarray:
    """(n_rot/2,) float64 angular speeds, with Llama 3 scaling or GGUF rope_freqs factors applied."""
    freqs = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    scaling = scaling or {}
    if scaling.get("freq_factors") is not None:  # GGUF rope_freqs.weight: divide per dimension
        return freqs / np.asarray(scaling["freq_factors"], dtype=np.float64)[: n_rot // 2]
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / freqs
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_ctx / low, freqs / factor, freqs)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return np.where(mid, (1 - smooth) * freqs / factor + smooth * freqs, scaled)
    if kind == "linear":
        return freqs / scaling["factor"]
    return freqs


def cos_sin(positions: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_tokens, n_rot/2) float32 cos and sin of position * frequency."""
    ang = positions.astype(np.float64)[:, None] * freqs[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
