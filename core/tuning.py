"""Choosing a decode split by measurement (the default policy, core/policy.py AutoSplit).

A split decode step costs about max(time of the CPU's j layers, time of the other layers' copies)
plus what runs on the GPU; both terms depend on this machine (its cores, memory and PCIe), so the
split is measured, not predicted: both ends first (every host layer streamed, every one on the
CPU), the balance point their per-layer costs predict, then neighbours while they are faster. The cost is not one valley: where the streamed layers fit the
ring's slots they stay there across steps and nothing is copied (a cliff down at n_host - slots), so
the caller names such points (`also`) to be measured too.
"""
from __future__ import annotations

from typing import Callable


def tune_split(n_host: int, step_seconds: Callable[[int], float], also=()) -> tuple[int, dict[int, float]]:
    """The CPU layer count in [0, n_host] whose decode step was fastest, and every one measured.
    also: more counts to measure before walking from the best (those in range)."""
    t: dict[int, float] = {}

    def f(j: int) -> float:
        if j not in t:
            t[j] = step_seconds(j)
        return t[j]

    stream, cpu = f(0), f(n_host)
    guess = round(n_host * stream / (stream + cpu)) if stream + cpu > 0 else n_host // 2
    best = min((guess, 0, n_host, *(j for j in also if 0 < j < n_host)), key=f)
    for step in (1, -1):  # walk from the best towards faster neighbours
        j = best
        while 0 <= j + step <= n_host and f(j + step) < f(best):
            j += step
            best = j
    return confirm(t, step_seconds), t


def confirm(t: dict, step_seconds: Callable, rounds: int = 2):
    """The better of the two fastest settings in `t` by the median of more measurements, taken in
    turn: one lucky step (the hosts lent with the H200 vary by tens of percent between steps) must
    not choose a setting whose typical step is slower (seen: every layer streamed at -ngl 0, 78 ms
    measured once, ~110 ms a step in the bench that followed). `t` gets the medians."""
    top = sorted(t, key=t.get)[:2]
    if len(top) < 2:
        return top[0]
    seen = {j: [t[j]] for j in top}
    for _ in range(rounds):
        for j in top:
            seen[j].append(step_seconds(j))
    for j in top:
        t[j] = sorted(seen[j])[len(seen[j]) // 2]
    return min(top, key=t.get)
