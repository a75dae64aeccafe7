"""A paged K/V cache for several sequences at once (continuous batching, `lstream serve`).

The K/V storage of every layer is split into fixed-size blocks of `block_size` token slots; a
sequence owns a block table (its blocks in order), so token position p of a sequence lives in slot
table[p // block_size] * block_size + p % block_size of each layer's storage. The storage is the
model's own K/V cache (core/kv_cache.py): one buffer per layer, allocated by the backend where the
residency puts the layer (host memory or the GPU), (n_ctx, n_kv_head, head_dim), read here as
n_ctx // block_size blocks. Nothing is allocated twice and per-layer placement is the model's.

Blocks are allocated and freed per request (BlockPool). A block that is full is registered under
the tokens it holds and every token before it (a hash chain): a later request whose prompt starts
with the same tokens takes those blocks instead of evaluating them again (a conversation that
continues, a shared system prompt). Freed registered blocks stay reusable until the pool needs
them (least recently freed first). Shared blocks are never written: a sequence writes only after
its reused prefix, into blocks of its own.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from .errors import LStreamError


class PoolExhausted(LStreamError, MemoryError):
    """No free block left (every block is held by a running sequence)."""


class BlockPool:
    def __init__(self, n_blocks: int):
        if n_blocks < 1:
            raise ValueError(f"a paged K/V cache needs at least one block, found {n_blocks}")
        self.n_blocks = n_blocks
        self.refs = [0] * n_blocks
        self.free: deque[int] = deque(range(n_blocks))  # never used, or evicted
        self.cached: OrderedDict[int, None] = OrderedDict()  # refcount 0 but registered (LRU order)
        self.index: dict[tuple, int] = {}  # prefix key -> block
        self.key_of: dict[int, tuple] = {}

    @property
    def n_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.n_blocks - len(self.free) - len(self.cached)

    def alloc(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.cached:
            b, _ = self.cached.popitem(last=False)
            del self.index[self.key_of.pop(b)]
        else:
            raise PoolExhausted(f"paged K/V cache full: all {self.n_blocks} blocks are in use")
        self.refs[b] = 1
        return b

    def release(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if b in self.key_of:
                self.cached[b] = None
            else:
                self.free.append(b)

    def register(self, b: int, key: tuple) -> None:
        """Block b is full and holds the prefix `key` names (first registration wins)."""
        if key not in self.index and b not in self.key_of:
            self.index[key] = b
            self.key_of[b] = key

    def take(self, key: tuple) -> int | None:
        """The block registered under key, with one more reference; None when there is none."""
        b = self.index.get(key)
        if b is None:
            return None
        if self.refs[b] == 0:
            self.cached.pop(b, None)
        self.refs[b] += 1
        return b


def block_keys(tokens, block_size: int, n_blocks: int | None = None) -> list[tuple]:
    """The prefix key of each full block of `tokens`: (hash of the previous key, this block's tokens)."""
    keys, prev = [], 0
    n = len(tokens) // block_size if n_blocks is None else n_blocks
    for i in range(n):
        key = (prev, tuple(int(t) for t in tokens[i * block_size:(i + 1) * block_size]))
        keys.append(key)
        prev = hash(key)
    return keys


@dataclass
class SeqKV:
    """One sequence's share of the cache: its block table and the tokens whose K/V it holds."""
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens with K/V in the cache, in order
    keys: list[tuple] = field(default_factory=list)  # prefix keys of its full blocks
    n_reused: int = 0  # leading tokens taken from the prefix cache

    @property
    def n(self) -> int:
        return len(self.tokens)


class PagedKVCache:
    """The blocks of a model's K/V cache shared by sequences. `layers` are the model cache's
    per-layer stores (what attention reads), `n_ctx` their slot count."""

    def __init__(self, kv, block_size: int = 16):
        if block_size < 1 or kv.n_ctx < block_size:
            raise ValueError(f"block size {block_size} does not fit a context of {kv.n_ctx}")
        self.kv, self.block_size = kv, block_size
        self.layers = kv.layers
        self.homes = kv.homes
        self.n_ctx = kv.n_ctx
        self.pool = BlockPool(kv.n_ctx // block_size)
        for store in self.layers:  # rows are slots now, written by the paged kernels: no decode mirror
            if hasattr(store, "no_half"):
                store.no_half()

    # -- sequences --------------------------------------------------------------------------
    def open(self, prompt: list[int], reuse: bool = True) -> SeqKV:
        """A new sequence for `prompt`, with the longest registered prefix of it (whole blocks, at
        most len(prompt) - 1 tokens: the last prompt token is always evaluated, its logits start
        the answer) taken from the cache."""
        seq = SeqKV()
        if not reuse:
            return seq
        bs = self.block_size
        for key in block_keys(prompt, bs, max(len(prompt) - 1, 0) // bs):
            b = self.pool.take(key)
            if b is None:
                break
            seq.blocks.append(b)
            seq.keys.append(key)
        seq.tokens = [int(t) for t in prompt[:len(seq.blocks) * bs]]
        seq.n_reused = seq.n
        return seq

    def reserve(self, seq: SeqKV, n_new: int) -> None:
        """Blocks for n_new more tokens of seq (allocated before the step that writes them)."""
        need = -(-(seq.n + n_new) // self.block_size)
        while len(seq.blocks) < need:
            seq.blocks.append(self.pool.alloc())

    def slots(self, seq: SeqKV, start: int, stop: int) -> np.ndarray:
        """Storage slots of positions [start, stop) of seq."""
        pos = np.arange(start, stop)
        bs = self.block_size
        return np.asarray(seq.blocks, dtype=np.int64)[pos // bs] * bs + pos % bs

    def append(self, seq: SeqKV, tokens) -> None:
        """tokens' K/V were written (at positions seq.n ...): record them, register full blocks."""
        seq.tokens.extend(int(t) for t in tokens)
        bs = self.block_size
        while len(seq.keys) < seq.n // bs:
            i = len(seq.keys)
            prev = hash(seq.keys[-1]) if seq.keys else 0
            key = (prev, tuple(seq.tokens[i * bs:(i + 1) * bs]))
            seq.keys.append(key)
            self.pool.register(seq.blocks[i], key)

    def close(self, seq: SeqKV) -> None:
        """Give the sequence's blocks back (registered ones stay reusable)."""
        for b in seq.blocks:
            self.pool.release(b)
        seq.blocks = []


@dataclass
class SeqBatch:
    """RunContext.batch of a ubatch that holds tokens of several sequences. Token t belongs to the
    sequence in row seq[t] of `tables`, sits at position ctx.positions[t] and writes its K/V into
    slot slots[t]; it attends to positions [0, positions[t]] (a sliding layer: the last `window`)
    of its own sequence, read through the table. A sequence's tokens are consecutive. Only the
    rows in out_rows get logits (the output norm selects them; None: every row)."""
    seq: np.ndarray  # (T,) int32
    slots: np.ndarray  # (T,) int64
    tables: np.ndarray  # (S, max blocks) int32, unused entries 0
    block_size: int
    out_rows: np.ndarray | None = None  # (K,) int64
    cache: dict = field(default_factory=dict)  # per-backend derived copies (device tensors), per ubatch

    @classmethod
    def build(cls, paged: PagedKVCache, seqs: list[SeqKV], counts: list[int],
              out_rows: np.ndarray | None = None) -> "SeqBatch":
        """counts[i] new tokens of seqs[i], at positions seqs[i].n ... (blocks already reserved)."""
        width = max(len(s.blocks) for s in seqs)
        tables = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            tables[i, :len(s.blocks)] = s.blocks
        seq = np.repeat(np.arange(len(seqs), dtype=np.int32), counts)
        slots = np.concatenate([paged.slots(s, s.n, s.n + c) for s, c in zip(seqs, counts)])
        return cls(seq, slots, tables, paged.block_size, out_rows)
