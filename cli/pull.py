"""`lstream pull`: a known model into the cache."""
from __future__ import annotations

import click

from ..loaders.registry import DEFAULT_MODEL, KNOWN
from .common import one_line_errors

HELP = "Download a known model into the cache (offline when it is already there).\n\n\b\nKnown models:\n" + \
    "\n".join(f"  {name:<14} {km.filename}{' (default)' if name == DEFAULT_MODEL else ''}"
              for name, km in sorted(KNOWN.items()))


@click.command(help=HELP)
@click.argument("name", default=DEFAULT_MODEL, type=click.Choice(sorted(KNOWN)))
@one_line_errors
def pull(name):
    from ..loaders.registry import pull as do_pull
    click.echo(do_pull(name))
