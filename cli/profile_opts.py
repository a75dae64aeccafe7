"""--profile and --trace, shared by run, bench and perplexity."""
from __future__ import annotations

import click


def profile_options(fn):
    opts = [
        click.option("--profile", "profile", is_flag=True,
                     help="print time per phase (copy to GPU, wait for copy, GPU/CPU compute, hop) per layer"),
        click.option("--trace", "trace", type=click.Path(dir_okay=False, writable=True), default=None,
                     help="write a Chrome/Perfetto trace (JSON) with one track per stream"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def echo_err(text: str) -> None:
    click.echo(text, err=True)
