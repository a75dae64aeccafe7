"""llama-bench's parameter syntax: comma lists and ranges first-last, first-last+step, first-last*mult."""
from __future__ import annotations

import re

import click

_RANGE = re.compile(r"^(-?\d+)-(-?\d+)(?:([+*])(\d+))?$")


def parse_values(text: str, what: str) -> list[int]:
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if re.fullmatch(r"-?\d+", part):
            out.append(int(part))
            continue
        m = _RANGE.match(part)
        if not m:
            raise click.BadParameter(f"expected N, N,M or first-last[+step|*mult], found {part!r}", param_hint=what)
        first, last, kind, step = int(m[1]), int(m[2]), m[3] or "+", int(m[4] or 1)
        if step < 1 or (kind == "*" and (step < 2 or first < 1)):
            raise click.BadParameter(f"range {part!r} never ends", param_hint=what)
        v = first
        while v <= last:
            out.append(v)
            v = v + step if kind == "+" else v * step
    return out


def parse_pairs(text: str, what: str) -> list[tuple[int, int]]:
    """-pg PP,TG (repeatable)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise click.BadParameter(f"expected PP,TG, found {text!r}", param_hint=what)
    return [(int(parts[0]), int(parts[1]))]
