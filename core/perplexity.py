"""Perplexity with llama-perplexity's method: chunks of n_ctx tokens, BOS first where the model
uses one, only the second half of each chunk scored."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PerplexityResult:
    ppl: float
    err: float
    n_tokens_scored: int
    chunk_ppl: list[float] = field(default_factory=list)
    nll: np.ndarray | None = None  # every scored token's negative log-likelihood


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(model, tokens: list[int], n_ctx: int = 512, on_chunk=None) -> PerplexityResult:
    n_chunk = len(tokens) // n_ctx
    if n_chunk == 0:
        raise ValueError(f"perplexity needs at least {n_ctx} tokens (-c), found {len(tokens)}")
    first = n_ctx // 2
    bos = model.config.bos_id if model.config.add_bos else None
    nlls = []
    total = total2 = 0.0
    count = 0
    running = []
    for i in range(n_chunk):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        model.reset()
        logits = model.eval(chunk, logits="all")
        lp = _log_softmax(logits[first:n_ctx - 1])
        nll = -lp[np.arange(len(lp)), np.asarray(chunk[first + 1:])]
        nlls.append(nll)
        total += nll.sum()
        total2 += (nll ** 2).sum()
        count += len(nll)
        running.append(math.exp(total / count))
        if on_chunk:
            on_chunk(i, running[-1])
    model.reset()
    mean = total / count
    var = total2 / count - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * err, count, running, np.concatenate(nlls))
