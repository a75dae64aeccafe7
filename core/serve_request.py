"""A generation request as the batching engine (core/batching.py) sees it: prompt tokens, sampling
and stop parameters, the text it has produced so far (incremental detokenization, stop strings held
back until they can no longer match), its timings, and the events it sends to whoever waits for it.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from .sampling import Sampler, SamplerConfig

_ids = itertools.count(1)


@dataclass
class GenParams:
    max_tokens: int = 16
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    cache_prompt: bool = True  # take a cached prefix of the prompt instead of evaluating it

    def sampler(self) -> Sampler:
        return Sampler(SamplerConfig(self.temperature, self.top_k, self.top_p, self.min_p, self.repeat_penalty,
                                     seed=self.seed))


@dataclass
class ReqTimings:
    """llama-server's `timings` of a response."""
    cache_n: int = 0  # prompt tokens taken from the cache
    prompt_n: int = 0  # prompt tokens evaluated
    prompt_s: float = 0.0
    predicted_n: int = 0
    predicted_s: float = 0.0
    queued_s: float = 0.0  # waiting for a slot

    def as_dict(self) -> dict:
        def rate(n, s):
            return n / s if s > 0 else 0.0
        return {"cache_n": self.cache_n,
                "prompt_n": self.prompt_n, "prompt_ms": 1e3 * self.prompt_s,
                "prompt_per_token_ms": 1e3 * self.prompt_s / self.prompt_n if self.prompt_n else 0.0,
                "prompt_per_second": rate(self.prompt_n, self.prompt_s),
                "predicted_n": self.predicted_n, "predicted_ms": 1e3 * self.predicted_s,
                "predicted_per_token_ms": 1e3 * self.predicted_s / self.predicted_n if self.predicted_n else 0.0,
                "predicted_per_second": rate(self.predicted_n, self.predicted_s)}


@dataclass
class Event:
    kind: str  # "text" (a delta), "done" (finish_reason), "error" (status, message)
    text: str = ""
    finish_reason: str | None = None
    status: int = 0


class TextStream:
    """Token ids -> text deltas: decodes only the recent ids (a piece that ends inside a UTF-8
    character waits for the next token), and holds back any tail that could begin a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decoded to the text already accounted for
        self.held = ""  # text decoded but not sent (it may start a stop string)
        self.text = ""  # everything sent

    def push(self, token: int) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the generation)."""
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return "", False
        self.prefix, self.read = self.read, len(self.ids)
        return self._feed(after[len(before):])

    def _feed(self, delta: str) -> tuple[str, bool]:
        buf = self.held + delta
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at = min(hits)[0]
            self.held = ""
            return self._send(buf[:at]), True
        keep = 0
        for s in self.stops:  # the longest tail of buf that is a prefix of a stop string
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return self._send(buf[:len(buf) - keep]), False

    def flush(self) -> str:
        """At the end (not by a stop string): the held text is sent after all."""
        out, self.held = self.held, ""
        return self._send(out)

    def _send(self, s: str) -> str:
        self.text += s
        return s


class GenRequest:
    """One completion: submitted to the engine, which calls `emit(Event)` from its thread."""

    def __init__(self, prompt: list[int], params: GenParams, emit: Callable[[Event], None] = lambda e: None):
        self.id = next(_ids)
        self.prompt = list(prompt)
        self.params = params
        self.emit = emit
        self.cancelled = False
        self.timings = ReqTimings()
        self.n_generated = 0
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()

    def __repr__(self):
        return f"GenRequest(#{self.id}, {len(self.prompt)} prompt tokens, max {self.params.max_tokens})"
