"""Per-layer K/V storage, each layer's buffers owned by the backend where the layer lives."""
from __future__ import annotations

from typing import Any

from .errors import LStreamError
from .residency import ResidencyMap


class ContextFullError(LStreamError, ValueError):
    """The tokens do not fit in the context (-c)."""


class KVCache:
    def __init__(self, n_ctx: int, n_layer: int, n_kv_head: int, head_dim: int,
                 residency: ResidencyMap, backends: dict):
        self.n_ctx = n_ctx
        self._n_past = 0
        self.homes = [residency.layer_home(layer) for layer in range(n_layer)]
        self.layers: list[Any] = [backends[h].alloc_kv(layer, n_ctx, n_kv_head, head_dim)
                                  for layer, h in enumerate(self.homes)]

    @property
    def n_past(self) -> int:
        return self._n_past

    @n_past.setter
    def n_past(self, n: int) -> None:
        if n < self._n_past:  # back to n: rows from n on are written again (a layer's copies of them go stale)
            for kv in self.layers:
                if hasattr(kv, "rewritten_from"):
                    kv.rewritten_from(n)
        self._n_past = n

    def prompt_done(self) -> None:
        """After a prompt: host layers bring their decode copies of its rows up to date (HostKV.catch_up)."""
        for kv in self.layers:
            if hasattr(kv, "catch_up"):
                kv.catch_up(self.n_past)

    def check_room(self, n_tokens: int) -> None:
        if self.n_past + n_tokens > self.n_ctx:
            raise ContextFullError(
                f"context full: {self.n_past} tokens cached + {n_tokens} new > context size {self.n_ctx} (raise -c)")

    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (the buffers are simply overwritten later)."""
        self.n_past = min(self.n_past, n)
