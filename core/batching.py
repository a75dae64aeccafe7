"""Continuous batching: several generation requests share one model, step by step.

Every step of the engine (run by one thread, `Engine.run`):
  1. cancelled requests leave (their blocks go back to the pool at once);
  2. waiting requests take free slots (-np), each with the longest cached prefix of its prompt;
  3. one ubatch is evaluated: up to `chunk` (-ub) prompt tokens of the sequences still reading
     their prompt (so the running ones keep decoding while a long prompt comes in), then the last
     token of every decoding sequence; it goes through the same graph, scheduler and backends as a
     single sequence, so the plan is the scheduler's for that many tokens and the upload policy
     decides for the whole batch;
  4. every sequence whose row has logits (a decoding one, or one whose prompt just ended) samples.
Requests leave when done (end of generation, max_tokens, a stop string, the slot's context full).

A token's computation depends only on its own sequence, never on what else shares the ubatch: the
CPU backend runs such ubatches through per-token kernels at every size (matmuls never switch to
sgemm, attention is one row kernel) and per-row ops. Greedy outputs are then the same alone,
concurrent, chunked any way or read from the prefix cache (tests/test_serve.py checks it).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .executor import Executor, RunContext
from .paged_kv import PagedKVCache, SeqBatch, SeqKV
from .serve_request import Event, GenRequest, TextStream
from .serve_stats import EngineStats


class QueueFull(Exception):
    """More requests than slots and queue places."""


class ShuttingDown(Exception):
    """The server stopped taking requests."""


@dataclass
class Active:
    """A request holding a slot."""
    req: GenRequest
    seq: SeqKV
    text: TextStream
    sampler: object
    history: list[int]
    decoding: bool = False
    last: int = -1  # the token the next decode step evaluates
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0


class Engine:
    def __init__(self, model, n_slots: int = 4, chunk: int = 64, block_size: int = 16, max_queue: int = 64,
                 n_ctx_slot: int | None = None, log=None):
        if n_slots < 1:
            raise ValueError(f"-np must be at least 1, found {n_slots}")
        if chunk < 1:
            raise ValueError(f"the prompt tokens per step (-ub) must be at least 1, found {chunk}")
        self.model, self.n_slots, self.chunk, self.max_queue = model, n_slots, chunk, max_queue
        self.paged = PagedKVCache(model.kv, block_size)
        per = (model.kv.n_ctx // n_slots // block_size) * block_size
        self.n_ctx_slot = min(n_ctx_slot or per, per)
        if self.n_ctx_slot < block_size:
            raise ValueError(f"-c {model.kv.n_ctx} is too small for -np {n_slots} (each slot needs at least "
                             f"{block_size} tokens)")
        self.ex = Executor(model.graph, model.by_name)
        self.body = Executor(model.body_graph, model.by_name)
        self.log = log  # callable(str) for --verbose, or None
        self.stats = EngineStats(n_slots)
        self.waiting: deque[GenRequest] = deque()
        self.active: list[Active] = []
        self.cond = threading.Condition()
        self.accepting, self.stopped = True, False
        self._placement: tuple | None = None

    # -- from other threads ------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        with self.cond:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.active) + len(self.waiting) >= self.n_slots + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"all {self.n_slots} slots are busy and the queue is full ({len(self.waiting)} "
                                f"requests waiting, --queue-size {self.max_queue})")
            self.waiting.append(req)
            self.cond.notify()

    def cancel(self, req: GenRequest) -> None:
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    def stop_accepting(self) -> None:
        """Shutdown, first part: new requests are refused, waiting ones fail with 503."""
        with self.cond:
            self.accepting = False
            waiting, self.waiting = list(self.waiting), deque()
            self.cond.notify()
        for r in waiting:
            r.emit(Event("error", "the server is shutting down", status=503))

    def cancel_running(self) -> None:
        """Every running request ends at the next step (finish reason "cancelled")."""
        with self.cond:
            for a in list(self.active):
                a.req.cancelled = True
            self.cond.notify()

    def stop(self) -> None:
        """Shutdown, last part: running requests are cancelled and the loop ends."""
        self.stop_accepting()
        self.cancel_running()
        with self.cond:
            self.stopped = True
            self.cond.notify()

    @property
    def queue_len(self) -> int:
        return len(self.waiting)

    def warmup(self, sizes=None) -> float:
        """Evaluate ubatches of each size a step may take first (1..8: the CPU compiles decode programs
        per size; 16: the op-by-op kernels; with a GPU also the largest step, chunk + slots tokens:
        from the upload threshold on it streams, whose kernels compile at first use), so no client
        pays for it. Nothing stays cached."""
        t0 = time.perf_counter()
        if sizes is None:
            sizes = {*range(1, min(self.n_slots, 8) + 1), min(self.chunk + self.n_slots, 16)}
            if getattr(self.model, "device_backend", None) is not None:
                sizes.add(min(self.chunk + self.n_slots, self.paged.n_ctx))
            sizes = sorted(sizes)
        tok = int(self.model.config.bos_id or 0)
        for n in sizes:
            seq = SeqKV()
            self.paged.reserve(seq, n)
            try:
                batch = SeqBatch.build(self.paged, [seq], [n], np.asarray([n - 1], dtype=np.int64))
                ctx = RunContext(np.full(n, tok, np.int32), np.arange(n), 0, self.paged, self.model.residency,
                                 "all", None, batch=batch)
                self.ex.run(self.model.plan(n), ctx, to_host=True)
            finally:
                self.paged.close(seq)
        return time.perf_counter() - t0

    # -- the engine thread -------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and not self.active and not self.waiting:
                    self.cond.wait(0.5)  # a timeout: signal handlers run on this (the main) thread
                if self.stopped and not self.active:
                    return
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - a bug outside a run: fail the running requests, go on
                for a in list(self.active):
                    self._finish(a, None, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    def step(self) -> None:
        self._reap()
        self._admit()
        parts = self._compose()
        if parts:
            self._guarded([a for a, _ in parts], self._run, parts)

    def _compose(self) -> list[tuple[Active, list[int]]]:
        """This step's ubatch: prompt tokens of the sequences still reading their prompt (first come
        first, at most `chunk` in all), then the last token of every decoding sequence."""
        parts, budget = [], self.chunk
        for a in self.active:
            if not a.decoding and budget > 0:
                n = min(len(a.req.prompt) - a.seq.n, budget)
                parts.append((a, a.req.prompt[a.seq.n:a.seq.n + n]))
                budget -= n
        return parts + [(a, [a.last]) for a in self.active if a.decoding]

    def _guarded(self, acts, fn, *args):
        """A failed run fails its requests (500), never the engine."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - the server must outlive any request
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            for a in acts:
                self._finish(a, None, error=f"{type(err).__name__}: {msg}")
            for b in self.model.backends:
                try:
                    b.synchronize()
                    b.release_memory()
                except Exception:  # noqa: BLE001
                    pass

    def _reap(self) -> None:
        for a in [a for a in self.active if a.req.cancelled]:
            self._finish(a, "cancelled")
        with self.cond:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)

    def _admit(self) -> None:
        while len(self.active) < self.n_slots:
            with self.cond:
                if not self.waiting or not self.accepting:
                    return
                req = self.waiting.popleft()
            p = req.params
            seq = self.paged.open(req.prompt, reuse=p.cache_prompt)
            tok = self.model.tokenizer
            a = Active(req, seq, TextStream(tok.decode, p.stop), p.sampler(), list(req.prompt))
            req.timings.cache_n = seq.n_reused
            req.timings.queued_s = a.t_start - req.t_submit
            self.active.append(a)
            self.stats.cached_tokens += seq.n_reused
            if self.log:
                self.log(f"request #{req.id}: {len(req.prompt)} prompt tokens, {seq.n_reused} from the cache, "
                         f"slot {len(self.active)}/{self.n_slots}")

    def _run(self, parts: list[tuple[Active, list[int]]]) -> None:
        """Evaluate one ubatch of several sequences; sample where a row has logits."""
        counts = [len(t) for _, t in parts]
        ends = np.cumsum(counts) - 1
        want = [k for k, (a, t) in enumerate(parts) if a.decoding or a.seq.n + len(t) == len(a.req.prompt)]
        seqs = [a.seq for a, _ in parts]
        for s, c in zip(seqs, counts):
            self.paged.reserve(s, c)
        toks = np.concatenate([np.asarray(t, dtype=np.int32) for _, t in parts])
        pos = np.concatenate([np.arange(s.n, s.n + c) for s, c in zip(seqs, counts)])
        m = self.model
        batch = SeqBatch.build(self.paged, seqs, counts, np.asarray(ends[want], dtype=np.int64))
        ctx = RunContext(toks, pos, 0, self.paged, m.residency, "all", m.profile, batch=batch)
        plan = m.plan(len(toks), with_output=bool(want))
        n_dec = sum(1 for a, _ in parts if a.decoding)
        self._describe(plan, n_dec, len(toks) - n_dec)
        t0 = time.perf_counter()
        out = (self.ex if want else self.body).run(plan, ctx, to_host=True if want else None)
        t1 = time.perf_counter()
        self.stats.step(n_dec, len(toks) - n_dec, t1 - t0)
        rows = dict(zip(want, range(len(want))))
        for k, ((a, t), s) in enumerate(zip(parts, seqs)):
            self.paged.append(s, t)
            if not a.decoding:
                a.req.timings.prompt_n += len(t)
                a.req.timings.prompt_s = t1 - a.t_start
            if k in rows:
                if not a.decoding:
                    a.decoding, a.t_first = True, t1
                self._take(a, out[rows[k]])

    def _take(self, a: Active, row: np.ndarray) -> None:
        """Sample a's next token from its logits row, send its text, finish or go on."""
        req, p = a.req, a.req.params
        tok = a.sampler(row, a.history)
        if not p.ignore_eos and self.model.tokenizer.is_eos(tok):
            return self._finish(a, "stop")
        a.history.append(tok)
        req.n_generated += 1
        self.stats.generated(1)
        delta, stopped = a.text.push(tok)
        if delta:
            req.emit(Event("text", delta))
        if stopped:
            return self._finish(a, "stop")
        if req.n_generated >= p.max_tokens or a.seq.n + 1 > self.n_ctx_slot:
            return self._finish(a, "length")
        a.last = tok

    def _finish(self, a: Active, reason: str | None, error: str | None = None) -> None:
        if a not in self.active:
            return
        self.active.remove(a)
        self.paged.close(a.seq)
        req, t = a.req, a.req.timings
        now = time.perf_counter()
        if a.t_first:
            t.predicted_s = now - a.t_first
        else:
            t.prompt_s = now - a.t_start
        t.predicted_n = req.n_generated
        req.finish_reason = reason
        self.stats.finished(reason or "error", t)
        if error is not None:
            req.emit(Event("error", error, status=500))
        else:
            tail = a.text.flush() if reason != "stop" else ""
            if tail:
                req.emit(Event("text", tail))
            req.emit(Event("done", finish_reason=reason))
        if self.log:
            self.log(f"request #{req.id} {reason or 'failed: ' + str(error)}: prompt {t.prompt_n} tokens "
                     f"({t.cache_n} cached) {1e3 * t.prompt_s:.0f} ms, {t.predicted_n} tokens "
                     f"{1e3 * t.predicted_s:.0f} ms")

    def _describe(self, plan, n_dec: int, n_prompt: int) -> None:
        """--verbose: where a step runs, whenever the placement changes (the policy decides for the
        whole ubatch: it changes with the number of sequences and prompt tokens in it)."""
        if self.log is None:
            return
        sig = plan.signature()
        if sig == self._placement:
            return
        self._placement = sig
        self.log(f"step of {n_dec} decoding + {n_prompt} prompt tokens: " + describe_plan(plan, self.model))


def describe_plan(plan, model) -> str:
    """'422 ops on cpu; policy threshold(32) uploads 0 weights (0.0 MiB)'."""
    counts: dict[str, int] = {}
    for a in plan.assignments():
        counts[a.backend] = counts.get(a.backend, 0) + 1
    ups = plan.uploads()
    where = ", ".join(f"{n} ops on {b}" for b, n in counts.items())
    if getattr(model, "device_backend", None) is None:
        return f"{where} (no GPU)"
    return f"{where}; policy {model.policy.describe()} uploads {len(ups)} weights ({plan.upload_bytes / 2**20:.1f} MiB)"
