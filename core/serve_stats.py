"""What the batching engine counts, and its Prometheus text exposition (`GET /metrics`)."""
from __future__ import annotations

import threading
import time
from collections import deque

# request prefill / decode seconds
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WINDOW_S = 10.0  # tokens per second over this many recent seconds


class Histogram:
    def __init__(self, buckets=BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class EngineStats:
    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.lock = threading.Lock()
        self.prompt_tokens = self.cached_tokens = self.generated_tokens = 0
        self.prefill_seconds = self.decode_seconds = 0.0
        self.steps = 0
        self.last_batch = 0
        self.rejected = 0
        self.finish: dict[str, int] = {}
        self.req_prefill = Histogram()
        self.req_decode = Histogram()
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens generated)

    def step(self, n_decode: int, n_prompt: int, seconds: float) -> None:
        """A ubatch of n_decode decoding sequences and n_prompt prompt tokens took `seconds` (shared
        between prefill and decode in proportion to their tokens)."""
        with self.lock:
            self.prompt_tokens += n_prompt
            self.prefill_seconds += seconds * n_prompt / (n_prompt + n_decode)
            self.decode_seconds += seconds * n_decode / (n_prompt + n_decode)
            self.steps += 1
            self.last_batch = n_decode

    def generated(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generated_tokens += n
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - WINDOW_S:
                self.recent.popleft()

    def finished(self, reason: str, timings) -> None:
        with self.lock:
            self.finish[reason] = self.finish.get(reason, 0) + 1
            self.req_prefill.observe(timings.prompt_s)
            self.req_decode.observe(timings.predicted_s)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - WINDOW_S:
                self.recent.popleft()
            if not self.recent:
                return 0.0
            return sum(n for _, n in self.recent) / WINDOW_S

    def prometheus(self, queue_len: int, active: int, kv_used: int, kv_total: int) -> str:
        """The text exposition format (version 0.0.4)."""
        tps = self.tokens_per_second()
        with self.lock:
            rows = [
                ("requests_waiting", "gauge", "requests waiting for a slot", [("", queue_len)]),
                ("slots_active", "gauge", "slots running a request", [("", active)]),
                ("slots_total", "gauge", "parallel slots (-np)", [("", self.n_slots)]),
                ("tokens_per_second", "gauge", f"generated tokens per second over the last {WINDOW_S:g} s",
                 [("", round(tps, 3))]),
                ("decode_batch_size", "gauge", "sequences in the last decode step", [("", self.last_batch)]),
                ("kv_blocks_used", "gauge", "paged K/V blocks held by requests", [("", kv_used)]),
                ("kv_blocks_total", "gauge", "paged K/V blocks", [("", kv_total)]),
                ("prompt_tokens_total", "counter", "prompt tokens evaluated", [("", self.prompt_tokens)]),
                ("prompt_tokens_cached_total", "counter", "prompt tokens taken from the prefix cache",
                 [("", self.cached_tokens)]),
                ("generated_tokens_total", "counter", "tokens generated", [("", self.generated_tokens)]),
                ("prefill_seconds_total", "counter", "seconds of ubatches spent on prompt tokens", [("", self.prefill_seconds)]),
                ("decode_seconds_total", "counter", "seconds of ubatches spent on decoding tokens", [("", self.decode_seconds)]),
                ("steps_total", "counter", "ubatches evaluated", [("", self.steps)]),
                ("requests_rejected_total", "counter", "requests refused with 503 (queue full)",
                 [("", self.rejected)]),
                ("requests_total", "counter", "finished requests by finish reason",
                 [(f'{{reason="{k}"}}', v) for k, v in sorted(self.finish.items())] or [('{reason="stop"}', 0)]),
            ]
            out = []
            for name, kind, help_, samples in rows:
                out += [f"# HELP lstream_{name} {help_}", f"# TYPE lstream_{name} {kind}"]
                out += [f"lstream_{name}{labels} {value}" for labels, value in samples]
            for name, h, help_ in (("request_prefill_seconds", self.req_prefill, "prompt time per request"),
                                   ("request_decode_seconds", self.req_decode, "generation time per request")):
                out += [f"# HELP lstream_{name} {help_}", f"# TYPE lstream_{name} histogram"]
                out += h.lines(f"lstream_{name}")
        return "\n".join(out) + "\n"
