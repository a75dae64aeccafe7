"""`lstream perplexity`: llama-perplexity's method and output.

The text is tokenized whole (with BOS in front where the model adds one), cut into chunks of -c
tokens (the tail that does not fill a chunk is dropped), each chunk evaluated from an empty cache
with its first token replaced by BOS where the model uses one, and only the second half of each
chunk scored. Printed as llama-perplexity does: `[i]ppl` after each chunk (running estimate),
then `Final estimate: PPL = x +/- y`."""
from __future__ import annotations

import time

import click

from .checks import check_chunks, end_line, out
from .common import load_model, model_options, one_line_errors
from .profile_opts import echo_err, profile_options


@click.command()
@model_options(n_ctx=512, min_ctx=4)  # half of each chunk is scored: at least 2 tokens
@click.option("-f", "--file", "text_file", type=click.Path(dir_okay=False, exists=True), required=True)
@click.option("--chunks", "n_chunks", type=int, default=-1, show_default=True, callback=check_chunks,
              help="max chunks to score (-1: all)")
@profile_options
@one_line_errors
def perplexity(text_file, n_chunks, profile, trace, **kw):
    """Perplexity of the model on a text file, in chunks of -c tokens."""
    from ..core.perplexity import perplexity as ppl
    from ..core.profile import profiling
    model = load_model(**kw)
    n_ctx = model.kv.n_ctx  # -c 0: the model's training context
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    click.echo("perplexity: tokenizing the input ..", err=True)
    tokens = model.tokenize(text)  # BOS first where the model adds one, as llama-perplexity
    click.echo(f"perplexity: tokenization took {1e3 * (time.perf_counter() - t0):.3f} ms", err=True)
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of "
                         f"{n_ctx}; tokenizing {text_file} gave {len(tokens)} (lower -c)")
    n_chunk = len(tokens) // n_ctx if n_chunks < 0 else min(n_chunks, len(tokens) // n_ctx)
    tokens = tokens[:n_chunk * n_ctx]
    click.echo(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, "
               f"batch_size={model.n_ubatch}, n_seq=1", err=True)
    t_start = time.perf_counter()

    def on_chunk(i, p):
        if i == 0:
            per = time.perf_counter() - t_start
            eta = per * (n_chunk - 1)
            click.echo(f"perplexity: {per:.2f} seconds per pass - ETA {int(eta // 60)} minutes "
                       f"{eta % 60:.2f} seconds", err=True)
        out(f"[{i + 1}]{p:.4f},")

    with profiling(model, profile, trace, echo=echo_err, title=f"perplexity, {n_chunk} chunks of {n_ctx}"):
        res = ppl(model, tokens, n_ctx, on_chunk=on_chunk)
        end_line()
        click.echo(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.err:.5f}")
