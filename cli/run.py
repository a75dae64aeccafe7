"""`lstream run`: an interactive chat by default (the model's chat template, multi-turn history,
/exit, /reset, Ctrl-C stops an answer, Ctrl-D quits); one-shot completion with -p or -f."""
from __future__ import annotations

import click

from ..core.sampling import Sampler, SamplerConfig
from .checks import Finite, at_least, check_seed, end_line, out, positive_float
from .common import load_model, model_options, one_line_errors
from .profile_opts import echo_err, profile_options

HELP = """commands:
  /exit, /quit   leave (Ctrl-D too)
  /reset         forget the conversation (keeps -sys)
  /help          this text
  a line ending in \\ continues on the next line; Ctrl-C stops the current answer"""


def sampling_options(fn):
    opts = [
        click.option("--temp", type=Finite(min=0.0), default=0.8, show_default=True, help="temperature (0: greedy)"),
        click.option("--top-k", type=at_least(0), default=40, show_default=True, help="0: off"),
        click.option("--top-p", type=Finite(0.0, 1.0), default=0.95, show_default=True, help="1: off"),
        click.option("--min-p", type=Finite(0.0, 1.0), default=0.05, show_default=True, help="0: off"),
        click.option("--repeat-penalty", type=positive_float(), default=1.0, show_default=True, help="1: off"),
        click.option("--seed", type=int, default=None, callback=check_seed, help="RNG seed (default or -1: random)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@click.command()
@model_options
@sampling_options
@click.option("-p", "--prompt", default=None, help="prompt: one-shot completion, then exit")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None,
              help="read the one-shot prompt from a file")
@click.option("-n", "--n-predict", type=at_least(-1), default=-1, show_default=True,
              help="tokens to generate per answer (-1: until end of turn or context full)")
@click.option("-cnv/-no-cnv", "--conversation/--no-conversation", "conversation", default=None,
              help="with -p/-f: wrap the prompt in the chat template (default: only with -sys)")
@click.option("-sys", "--system-prompt", default=None)
@click.option("--verbose", is_flag=True, help="print where load time went, and (one-shot) llama.cpp's timing lines")
@profile_options
@one_line_errors
def run(prompt, prompt_file, n_predict, conversation, system_prompt, verbose, temp, top_k, top_p, min_p,
        repeat_penalty, seed, profile, trace, **kw):
    """Chat with the model (default), or complete -p PROMPT / -f FILE once."""
    from ..core.profile import profiling
    if prompt_file:
        with open(prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    t0 = _now()
    model = load_model(**kw)
    load_s = _now() - t0
    if verbose:
        from .chat import load_lines
        click.echo(load_lines(model, load_s), err=True)
    sampler = Sampler(SamplerConfig(temp, top_k, top_p, min_p, repeat_penalty, seed=seed))
    with profiling(model, profile, trace, echo=echo_err, title="run"):
        if prompt is None:
            interactive(model, sampler, system_prompt, n_predict)
        else:
            one_shot(model, sampler, prompt, n_predict, bool(conversation or (conversation is None and system_prompt)),
                     system_prompt, verbose, load_s)


def _now() -> float:
    import time
    return time.perf_counter()


def one_shot(model, sampler, prompt, n_predict, chat, system_prompt, verbose, load_s):
    from ..core.timings import Timings
    timings = Timings()
    bos = None
    if chat:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": prompt}]
        prompt, bos = model.tokenizer.apply_chat(msgs), False
    else:
        out(prompt)
    n = n_predict if n_predict >= 0 else model.kv.n_ctx
    model.reset()
    try:
        for piece in model.stream(prompt, n, sampler, timings, bos=bos):
            out(piece)
    except KeyboardInterrupt:
        end_line()
        click.echo("[interrupted]", err=True)
    out("\n")
    if model.n_past >= model.kv.n_ctx:
        click.echo(f"[context full: stopped at {model.kv.n_ctx} tokens (-c)]", err=True)
    if verbose:
        from .chat import perf_lines
        click.echo(perf_lines(timings, load_s), err=True)


def _read_message(pending: list[str], prompt: str = "> ") -> str:
    """One user message; a line ending in a backslash continues on the next line. Lines typed
    while the last answer streamed come first, shown after the prompt as if typed there."""
    lines = []
    while True:
        p = prompt if not lines else "... "
        if pending:
            line = pending.pop(0)
            click.echo(p + line)
        else:
            line = input(p)
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def interactive(model, sampler, system_prompt, n_predict):
    from .chat import ChatSession
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    if not model.tokenizer.chat_template:
        click.echo("note: the model has no chat template; turns are joined as plain text", err=True)
    session = ChatSession(model, sampler, system_prompt, n_predict)
    click.echo(f"lstream chat: {model.config.name or model.config.arch}, context {model.kv.n_ctx} tokens. "
               "/exit or Ctrl-D to quit, /reset to start over, Ctrl-C stops an answer, /help.", err=True)
    interrupted_at_prompt = False
    pending: list[str] = []  # lines typed during the last answer: the next messages
    eof = False
    while True:
        try:
            if eof and not pending:
                raise EOFError
            text = _read_message(pending)
        except EOFError:  # Ctrl-D
            click.echo("")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: twice in a row quits
            if interrupted_at_prompt:
                click.echo("")
                return
            interrupted_at_prompt = True
            click.echo("\n(Ctrl-C again, Ctrl-D or /exit to quit)")
            continue
        interrupted_at_prompt = False
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return
        if cmd in ("/reset", "/clear"):
            session.reset()
            click.echo("(conversation reset)")
            continue
        if cmd in ("/help", "/?"):
            click.echo(HELP)
            continue
        typed, ended = _answer(session, text)
        pending += typed
        eof = eof or ended


def _answer(session, text) -> tuple[list[str], bool]:
    """One answer, streamed; returns the lines typed meanwhile and whether Ctrl-D was typed."""
    from ..core.kv_cache import ContextFullError
    from .chat import timings_line
    from .typeahead import TypeAhead
    n_ctx = session.model.kv.n_ctx
    with TypeAhead() as typed:
        try:
            ans = session.answer(text, on_piece=out)
        except ContextFullError as e:
            end_line()
            click.echo(f"[{e}]", err=True)
            ans = None
        except KeyboardInterrupt:  # between tokens but outside generation (e.g. tokenizing)
            end_line()
            click.echo("[interrupted]")
            ans = None
    if ans is not None:
        out("\n")
        if ans.stop == "interrupted":
            click.echo("[interrupted]")
        elif ans.stop == "context":
            click.echo(f"[context full: the answer stopped at {n_ctx} tokens; /reset to start over "
                       "or raise -c]", err=True)
        click.echo(timings_line(ans.timings), err=True)
    return typed.lines, typed.eof
