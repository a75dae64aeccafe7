"""`lstream run`: one-shot completion with -p/-f (interactive chat comes with the chat issue)."""
from __future__ import annotations

import sys

import click

from ..core.sampling import Sampler, SamplerConfig
from .common import load_model, model_options, one_line_errors
from .main import cli


def sampling_options(fn):
    opts = [
        click.option("--temp", type=float, default=0.8, show_default=True),
        click.option("--top-k", type=int, default=40, show_default=True),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--min-p", type=float, default=0.05, show_default=True),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@cli.command()
@model_options
@sampling_options
@click.option("-p", "--prompt", default=None, help="prompt (one-shot)")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None, help="read the prompt from a file")
@click.option("-n", "--n-predict", type=int, default=128, show_default=True)
@click.option("-cnv/-no-cnv", "--chat/--no-chat", "chat", default=False, help="wrap the prompt in the chat template")
@click.option("-sys", "--system-prompt", default=None)
@click.option("--verbose", is_flag=True, help="print timings")
@one_line_errors
def run(prompt, prompt_file, n_predict, chat, system_prompt, verbose, temp, top_k, top_p, min_p,
        repeat_penalty, seed, **kw):
    """Generate a completion of PROMPT (or chat with --chat)."""
    if prompt_file:
        with open(prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    if prompt is None:
        raise click.UsageError("give a prompt with -p or -f")
    from ..core.engine import Timings
    model = load_model(**kw)
    sampler = Sampler(SamplerConfig(temp, top_k, top_p, min_p, repeat_penalty, seed=seed))
    timings = Timings()
    bos = None
    if chat or system_prompt:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": prompt}]
        prompt, bos = model.tokenizer.apply_chat(msgs), False
    else:
        click.echo(prompt, nl=False)
    for piece in model.stream(prompt, n_predict, sampler, timings, bos=bos):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo("")
    if verbose:
        click.echo(timings.line(), err=True)
