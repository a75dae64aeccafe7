"""`lstream serve`: the OpenAI-compatible server (server.py) over continuous batching
(core/batching.py), with llama-server's flags: -np parallel slots, -c the total context (each slot
gets -c / -np), -ub the prompt chunk, -ngl and the upload-policy flags."""
from __future__ import annotations

import os
import sys

import click

from .common import load_model, model_options, one_line_errors


@click.command()
@model_options(n_ubatch=64)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("-np", "--parallel", "n_parallel", type=int, default=4, show_default=True,
              help="parallel slots: requests decoded together in one batch (each holds -c / -np tokens)")
@click.option("--queue-size", type=int, default=64, show_default=True,
              help="requests that may wait for a slot; beyond them the server answers 503")
@click.option("-a", "--alias", default=None, help="model name in responses and /v1/models (default: the file's)")
@click.option("--block-size", type=int, default=8, show_default=True,
              help="tokens per paged K/V block (also the granularity of prompt-prefix reuse)")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="on SIGINT/SIGTERM, seconds running requests may take to finish before they are cancelled")
@click.option("--act8/--no-act8", default=True, show_default=True,
              help="CPU: int8 activations for Q4_0/Q4_1 weights (as llama-server; faster batches) instead of int16")
@click.option("--verbose", is_flag=True, help="log requests, and where each decode batch size runs (the policy's "
                                              "decision for the whole batch)")
@one_line_errors
def serve(host, port, n_parallel, queue_size, alias, block_size, grace, act8, verbose, **kw):
    """Serve the model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

    Each step evaluates up to -ub prompt tokens with one token of every decoding request; a prompt
    prefix cached in whole --block-size blocks is reused."""
    from ..core.batching import Engine
    from ..server import Service, serve as run_server
    if n_parallel < 1:
        raise click.BadParameter(f"must be at least 1, found {n_parallel}", param_hint="-np")
    if queue_size < 0:
        raise click.BadParameter(f"must be at least 0, found {queue_size}", param_hint="--queue-size")
    chunk = kw["n_ubatch"]
    if chunk < 1:
        raise click.BadParameter(f"must be at least 1, found {chunk}", param_hint="-ub")
    if block_size < 1:
        raise click.BadParameter(f"must be at least 1, found {block_size}", param_hint="--block-size")
    log = (lambda s: click.echo(f"[serve] {s}", err=True)) if verbose else None
    model = load_model(act8=act8, **kw)
    engine = Engine(model, n_slots=n_parallel, chunk=chunk, block_size=block_size, max_queue=queue_size, log=log)
    name = alias or os.path.basename(str(model.loaded.path))
    service = Service(model, engine, name, log=log)
    warm = service.warmup()
    if verbose:
        log(f"warm-up: {warm:.1f} s")
    for note in model.notes:
        click.echo(f"note: {note}", err=True)

    def ready():
        click.echo(f"lstream serve: {name} on http://{host}:{port} ({n_parallel} slots of {engine.n_ctx_slot} tokens, "
                   f"prompt chunks of {chunk}, {model.cpu.n_threads} CPU threads"
                   + (f", {model.device_backend.describe()}" if model.device_backend else "") + ")", err=True)
        sys.stderr.flush()
    code = run_server(service, host, port, grace=grace, verbose=verbose, on_ready=ready)
    if code:
        raise SystemExit(code)  # uvicorn said why (the port taken, say)
    click.echo("lstream serve: stopped", err=True)
