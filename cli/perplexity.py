"""`lstream perplexity`: llama-perplexity's method and output."""
from __future__ import annotations

import click

from .common import load_model, model_options, one_line_errors
from .main import cli


@cli.command()
@model_options(n_ctx=512)
@click.option("-f", "--file", "text_file", type=click.Path(dir_okay=False), required=True)
@one_line_errors
def perplexity(text_file, **kw):
    """Perplexity of the model on a text file, in chunks of -c tokens."""
    from ..core.perplexity import perplexity as ppl
    n_ctx = kw["n_ctx"]
    model = load_model(**kw)
    with open(text_file, encoding="utf-8") as f:
        tokens = model.tokenize(f.read(), bos=False)
    n_chunk = len(tokens) // n_ctx
    click.echo(f"perplexity: tokenized {len(tokens)} tokens; calculating over {n_chunk} chunks, n_ctx={n_ctx}")
    res = ppl(model, tokens, n_ctx, on_chunk=lambda i, p: click.echo(f"[{i + 1}]{p:.4f},", nl=False))
    click.echo("")
    click.echo(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.err:.5f}")
