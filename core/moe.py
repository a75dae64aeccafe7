"""Mixture-of-experts routing: the one definition every backend follows (numpy, no torch).

Qwen3-MoE, Qwen2-MoE and Mixtral route alike: softmax over the router's logits, the top-k experts
by probability, their probabilities renormalized to sum to 1 when the model says so (Qwen3-MoE's
norm_topk_prob, and always for Mixtral, whose softmax over the top-k logits is the same thing).
A token's output is the sum of its experts' SwiGLU FFNs weighted by these weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def route(logits: np.ndarray, top_k: int, norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """logits (T, n_expert) -> (ids (T, top_k) int32, weights (T, top_k) float32), each token's
    experts by decreasing probability."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1, np.shape(logits)[-1])
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    k = min(top_k, p.shape[1])
    part = np.argpartition(-p, k - 1, axis=1)[:, :k] if k < p.shape[1] else np.tile(np.arange(k), (len(p), 1))
    top = np.take_along_axis(p, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1)
    w = np.take_along_axis(top, order, axis=1)
    if norm:
        w = w / w.sum(axis=1, keepdims=True)
    return ids.astype(np.int32), w.astype(np.float32)


@dataclass
class Groups:
    """The (token, slot) pairs of a routing, grouped by expert: pairs[starts[j]:starts[j+1]] are
    routed to experts[j]; a pair p is token pairs[p] // top_k, slot pairs[p] % top_k."""
    experts: np.ndarray  # (n_used,) int: the experts that have tokens, ascending
    starts: np.ndarray  # (n_used + 1,) int
    pairs: np.ndarray  # (n_pairs,) int: flat indices into ids

    def tokens(self, j: int, top_k: int) -> np.ndarray:
        return self.pairs[self.starts[j]:self.starts[j + 1]] // top_k

    def counts(self) -> np.ndarray:
        return np.diff(self.starts)


def group(ids: np.ndarray, n_expert: int, keep: np.ndarray | None = None) -> Groups:
    """Pairs grouped by expert; ids < 0 (and pairs where `keep` is False) are left out."""
    flat = np.asarray(ids).reshape(-1)
    sel = flat >= 0 if keep is None else (flat >= 0) & np.asarray(keep).reshape(-1)
    pairs = np.nonzero(sel)[0]
    pairs = pairs[np.argsort(flat[pairs], kind="stable")]
    counts = np.bincount(flat[pairs], minlength=n_expert)
    experts = np.nonzero(counts)[0]
    starts = np.concatenate([[0], np.cumsum(counts[experts])])
    return Groups(experts, starts, pairs)


def expert_counts(ids: np.ndarray, n_expert: int) -> np.ndarray:
    """Tokens routed to each expert (n_expert,)."""
    flat = np.asarray(ids).reshape(-1)
    return np.bincount(flat[flat >= 0], minlength=n_expert)
