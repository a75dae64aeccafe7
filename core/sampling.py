"""Token sampling over host logits: llama.cpp's chain (penalties, top-k, top-p, min-p, temperature)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerConfig:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None


class Sampler:
    def __init__(self, cfg: SamplerConfig | None = None, **kw):
        self.cfg = cfg or SamplerConfig(**kw)
        self.rng = np.random.default_rng(self.cfg.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        c = self.cfg
        x = np.array(logits, dtype=np.float64, copy=True)
        if c.repeat_penalty != 1.0 and history:
            recent = np.unique(np.asarray(history[-c.repeat_last_n:], dtype=np.int64))
            vals = x[recent]
            x[recent] = np.where(vals > 0, vals / c.repeat_penalty, vals * c.repeat_penalty)
        if c.temp <= 0:
            return int(np.argmax(x))
        idx = np.argsort(-x, kind="stable")
        if 0 < c.top_k < len(idx):
            idx = idx[: c.top_k]
        vals = x[idx]
        p = np.exp(vals - vals[0])
        p /= p.sum()
        if c.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            idx, vals = idx[:keep], vals[:keep]
        if c.min_p > 0.0:
            p = np.exp(vals - vals[0])
            keep = p >= c.min_p * p[0]
            idx, vals = idx[keep], vals[keep]
        p = np.exp((vals - vals[0]) / c.temp)
        p /= p.sum()
        return int(idx[self.rng.choice(len(idx), p=p)])
