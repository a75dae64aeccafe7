"""llama-bench's timing: a warm-up, then repetitions with random tokens; t/s per repetition."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BenchResult:
    n_prompt: int
    n_gen: int
    n_depth: int
    samples_ns: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.n_prompt and self.n_gen:
            t = f"pp{self.n_prompt}+tg{self.n_gen}"
        elif self.n_prompt:
            t = f"pp{self.n_prompt}"
        else:
            t = f"tg{self.n_gen}"
        return t + (f" @ d{self.n_depth}" if self.n_depth else "")

    @property
    def samples_ts(self) -> list[float]:
        n = self.n_prompt + self.n_gen
        return [1e9 * n / s for s in self.samples_ns]

    @property
    def avg_ns(self) -> float:
        return statistics.fmean(self.samples_ns)

    @property
    def stddev_ns(self) -> float:
        return statistics.stdev(self.samples_ns) if len(self.samples_ns) > 1 else 0.0

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0


def _random_tokens(rng, vocab: int, n: int) -> np.ndarray:
    return rng.integers(0, vocab, size=n, dtype=np.int32)


def _prompt(model, tokens: np.ndarray, n_batch: int) -> None:
    for i in range(0, len(tokens), n_batch):
        model.eval(tokens[i:i + n_batch])


def _gen(model, first: int, n: int) -> None:
    tok = first
    for _ in range(n):
        logits = model.eval([tok])
        tok = int(np.argmax(logits))


def _prefill_graphs(model) -> bool:
    replay = getattr(getattr(model, "runner", None), "replay", None)
    return replay is not None and replay.use_graphs and bool(getattr(replay.be, "static_prefill", False))


def run_test(model, n_prompt: int, n_gen: int, n_depth: int = 0, reps: int = 5, n_batch: int = 2048,
             warmup: bool = True, seed: int = 0, progress=None) -> BenchResult:
    """One llama-bench test: a warm-up (the whole prompt, twice where prompts replay from graphs; one
    generated token; not timed), then `reps` timed repetitions on random tokens after `n_depth`
    tokens of context. A profile attached
    to the model (model.profile) is reset after the warm-up, so it covers the timed repetitions.
    `progress(str)` is told each step, as llama-bench --progress prints them."""
    say = progress or (lambda s: None)
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    res = BenchResult(n_prompt, n_gen, n_depth)
    if warmup:
        model.reset()
        if n_prompt:
            # twice where prompt ubatches replay from graphs: a size's graph is captured the second
            # time it comes (core/replay.py), a one-time cost like the kernels' compiles
            for k in range(2 if _prefill_graphs(model) else 1):
                say("warmup prompt run")
                if k:
                    model.reset()
                _prompt(model, _random_tokens(rng, vocab, n_prompt), n_batch)
        if n_gen:
            say("warmup generation run")
            _gen(model, int(rng.integers(vocab)), 1)
    if getattr(model, "profile", None) is not None:
        model.profile.reset()
    for rep in range(reps):
        model.reset()
        if n_depth:
            say(f"depth run {rep + 1}/{reps}")
            prof, model.profile = getattr(model, "profile", None), None  # the depth fill is not measured
            try:
                _prompt(model, _random_tokens(rng, vocab, n_depth), n_batch)
            finally:
                model.profile = prof
        say(f"{'prompt' if n_prompt else 'generation'} run {rep + 1}/{reps}")
        prompt = _random_tokens(rng, vocab, n_prompt)
        first = int(rng.integers(vocab))
        model.synchronize()
        t0 = time.perf_counter_ns()
        if n_prompt:
            _prompt(model, prompt, n_batch)
        if n_gen:
            _gen(model, first, n_gen)
        model.synchronize()
        res.samples_ns.append(time.perf_counter_ns() - t0)
    model.reset()
    return res


def bench(model, n_prompt: int = 512, n_gen: int = 128, n_depth: int = 0, reps: int = 5, n_batch: int = 2048,
          warmup: bool = True) -> list[BenchResult]:
    """llama-bench's default pair of tests on a loaded model: pp`n_prompt` and tg`n_gen` (either may be 0).

        for r in lstream.bench(model, n_prompt=64, n_gen=16, reps=3):
            print(r.name, f"{r.avg_ts:.1f} ± {r.stddev_ts:.1f} t/s")
    """
    tests = [(n_prompt, 0)] * bool(n_prompt) + [(0, n_gen)] * bool(n_gen)
    return [run_test(model, pp, tg, n_depth, reps, n_batch, warmup) for pp, tg in tests]
