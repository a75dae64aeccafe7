"""Parse-time checks of the numeric flags (click types and callbacks), the threads warning, and the
one line that partial output (an echoed prompt, a streamed answer, perplexity's `[i]ppl,`) may
leave open: an error or a message printed after it starts on a line of its own."""
from __future__ import annotations

import math
import sys

import click

# -- numbers --------------------------------------------------------------------------------------


def at_least(n: int) -> click.IntRange:
    return click.IntRange(min=n)


class Finite(click.FloatRange):
    """A float in a range, never nan or inf (click's FloatRange lets nan through)."""

    def convert(self, value, param, ctx):
        v = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(v, param, ctx)


def positive_float() -> Finite:
    return Finite(min=0.0, min_open=True)


def threads_warning(n: int, flag: str = "-t") -> None:
    """More threads than CPUs: llama.cpp runs anyway; here numba's pool has at most one per CPU."""
    from ..backends.devices import cpu_count
    k = cpu_count()
    if n > k:
        click.echo(f"warning: {flag} {n} is more than the {k} CPUs here: {k} threads run", err=True)


def check_threads(ctx, param, value):
    """-t N (None: the physical cores): at least 1; more than the CPUs here warns."""
    if value is not None:
        if value < 1:
            raise click.BadParameter(f"{value} is not a thread count: expected 1 or more")
        threads_warning(value)
    return value


def check_chunks(ctx, param, value):
    if value == 0 or value < -1:
        raise click.BadParameter(f"expected -1 (all chunks) or 1 or more, found {value}")
    return value


def check_seed(ctx, param, value):
    if value is not None and value < -1:
        raise click.BadParameter(f"expected -1 (random) or 0 or more, found {value}")
    return None if value == -1 else value


# -- the open line --------------------------------------------------------------------------------

_open = [False]  # whether the last thing written to stdout left its line unfinished


def out(text: str) -> None:
    """Write to stdout without a newline (streamed output), remembering whether a line is open."""
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
        _open[0] = not text.endswith("\n")


def end_line() -> None:
    """Finish an open stdout line, so that what follows (the next line, an error on stderr) starts
    on a line of its own."""
    if _open[0]:
        _open[0] = False
        click.echo("")


def reset_line() -> None:
    _open[0] = False
