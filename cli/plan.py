"""`lstream plan`: where each op runs at a given ubatch size, and why."""
from __future__ import annotations

import click

from .common import load_model, model_options, one_line_errors


@click.command()
@model_options
@click.option("-v", "--verbose", is_flag=True, help="every node, not only per layer")
@one_line_errors
def plan(verbose, **kw):
    """Where each op runs at a given ubatch size (-ub), and why."""
    from .plan_view import print_plan
    m = load_model(load_tokenizer=False, **kw)
    print_plan(m, m.plan(kw["n_ubatch"]), verbose)
