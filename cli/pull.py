"""`lstream pull`: a known model into the cache."""
from __future__ import annotations

import click

from .common import one_line_errors


@click.command()
@click.argument("name", default="smollm2-135m")
@one_line_errors
def pull(name):
    """Download a known model into the cache (smollm2-135m)."""
    from ..loaders.registry import pull as do_pull
    click.echo(do_pull(name))
