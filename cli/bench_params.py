"""llama-bench's parameter syntax: comma lists and ranges first-last, first-last+step, first-last*mult."""
from __future__ import annotations

import re

import click

MAX_VALUES = 4096  # per option: a range that long is a typo, not a benchmark
_RANGE = re.compile(r"^(-?\d+)-(-?\d+)(?:([+*])(\d+))?$")


def parse_values(text: str, what: str, minimum: int | None = None, maximum: int | None = None) -> list[int]:
    """N, N,M or ranges; every value within [minimum, maximum] where given."""
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
            if len(out) > MAX_VALUES:
                raise click.BadParameter(f"range {part!r} gives more than {MAX_VALUES} values", param_hint=what)
    for v in out:
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            bounds = f"{minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
            raise click.BadParameter(f"expected values of {bounds}, found {v}", param_hint=what)
    return out


def values_option(minimum: int | None = None, maximum: int | None = None):
    """A click callback: every value of a repeatable comma/range option checked at parse time."""
    def check(ctx, param, value):
        for text in value or ():
            parse_values(text, "/".join(param.opts), minimum, maximum)
        return value
    return check


def parse_shares(text: str, what: str = "--moe-share") -> list[int]:
    """--moe-share: counts, comma lists and ranges as parse_values, or 'auto' (MOE_SHARE_AUTO: half a
    token's routed experts)."""
    from ..core.options import MOE_SHARE_AUTO
    out = []
    for part in str(text).split(","):
        if part.strip() == "auto":
            out.append(MOE_SHARE_AUTO)
            continue
        try:
            out += parse_values(part, what, 0)
        except click.BadParameter as e:
            raise click.BadParameter(f"{e.message} (or auto)", param_hint=what) from None
    return out


def parse_pairs(text: str, what: str) -> list[tuple[int, int]]:
    """-pg PP,TG (repeatable)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(re.fullmatch(r"\d+", p) for p in parts) or parts == ["0", "0"]:
        raise click.BadParameter(f"expected PP,TG (tokens, not both 0), found {text!r}", param_hint=what)
    return [(int(parts[0]), int(parts[1]))]


def check_pairs(ctx, param, value):
    for text in value or ():
        parse_pairs(text, "-pg")
    return value


POLICIES = ("auto", "threshold", "never", "always", "cost")


def policy_ok(name: str) -> bool:
    if name in POLICIES:
        return True
    from ..core.policy import make_policy
    try:
        return name.startswith("split:") and make_policy(name) is not None
    except ValueError:
        return False


def check_policy(ctx, param, value):
    """--policy NAME (run, plan, perplexity)."""
    if value is not None and not policy_ok(value):
        raise click.BadParameter(f"expected auto, threshold, never, always, split:N[:SHARE] or cost, found {value!r}")
    return value


def check_policies(ctx, param, value):
    """--policy A,B (bench, repeatable)."""
    for text in value or ():
        for name in text.split(","):
            check_policy(ctx, param, name)
    return value
