"""`lstream run`: the chat session's cache reuse and context handling on the real model, and the
interactive command driven through a pseudo-terminal (two turns, Ctrl-C mid-answer, /exit)."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lstream.cli.chat import ChatSession
from lstream.core.kv_cache import ContextFullError
from lstream.core.sampling import Sampler, SamplerConfig


@pytest.fixture(scope="module")
def model():
    import lstream
    from lstream.loaders.registry import pull
    m = lstream.load(str(pull("smollm2-135m", quiet=True)), n_ctx=256, n_threads=1)
    yield m
    m.close()


CLI = [sys.executable, "-c", "from lstream.cli.main import main; main()"]


def greedy():
    return Sampler(SamplerConfig(temp=0.0))


def test_second_turn_reuses_the_cached_prefix(model):
    s = ChatSession(model, greedy(), system_prompt="You are brief.", n_predict=8)
    pieces = []
    a1 = s.answer("Name a colour.", on_piece=pieces.append)
    assert a1.stop in ("eos", "limit") and a1.text == "".join(pieces)
    assert a1.n_reused == 0
    assert len(s.cached) == model.n_past and s.cached[:5] == s.render(s.messages[:-1])[:5]
    a2 = s.answer("Another one.")
    # the whole first exchange up to where re-rendering the answer differs came from the cache
    assert a2.n_reused >= len(s.render(s.messages[:2])) - 1
    assert a2.timings.prompt_tokens < len(s.render(s.messages[:-1]))
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    # the cache holds exactly what a fresh evaluation of the same tokens would hold
    n = model.n_past
    assert len(s.cached) == n
    s.reset()
    assert model.n_past == 0 and [m["role"] for m in s.messages] == ["system"]


def test_reused_prefix_gives_the_logits_of_a_fresh_evaluation(model):
    import numpy as np
    from lstream.cli.chat import common_prefix
    s = ChatSession(model, greedy(), n_predict=6)
    s.answer("Say hello.")
    full = s.render(s.messages + [{"role": "user", "content": "Say goodbye."}])
    keep = min(common_prefix(s.cached, full), len(full) - 1)
    assert keep > len(full) // 2  # most of the conversation is reused
    model.kv.truncate(keep)
    reused = model.eval(full[keep:])
    model.reset()
    fresh = model.eval(full)
    model.reset()
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=2e-2 * np.abs(fresh).max())


def test_context_overflow_stops_the_answer_and_keeps_the_session(model):
    s = ChatSession(model, greedy(), n_predict=-1)
    a = s.answer("Count from 1 to 1000, one number per line.")
    assert a.stop in ("context", "eos")
    if a.stop == "context":
        assert model.n_past == model.kv.n_ctx
    with pytest.raises(ContextFullError, match="context full"):
        s.answer("word " * 300)
    assert s.messages[-1]["role"] == "assistant"  # history as it was
    s.reset()
    assert s.answer("Hi", ).stop in ("eos", "context")


def test_one_shot_prompt(model, monkeypatch, tmp_path):
    import lstream.cli.run as run_mod
    from lstream.cli.main import cli
    monkeypatch.setattr(run_mod, "load_model", lambda **kw: model)
    res = CliRunner().invoke(cli, ["run", "-p", "The capital of France is", "-n", "4", "--temp", "0", "--verbose"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("The capital of France is")
    assert "prompt eval time" in res.stderr and "tokens per second" in res.stderr
    f = tmp_path / "p.txt"
    f.write_text("Question: what is 2+2?")
    trace = tmp_path / "run.json"
    res = CliRunner().invoke(cli, ["run", "-f", str(f), "-n", "3", "--temp", "0", "-sys", "Be brief.",
                                   "--profile", "--trace", str(trace)])
    assert res.exit_code == 0, res.output
    assert "profile: run" in res.stderr and trace.exists()


def test_interactive_through_a_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    lstream_cli = CLI
    child = pexpect.spawn(lstream_cli[0], lstream_cli[1:] + ["run", "--temp", "0", "-t", "1", "-c", "1024",
                                                           "-n", "200", "-sys", "You are a storyteller."],
                          encoding="utf-8", timeout=180, dimensions=(40, 200),
                          # start as from a shell: Ctrl-C's default disposition, whatever pytest's is
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.logfile_read = open(tmp_path / "session.log", "w")
    try:
        child.expect_exact("> ")
        child.sendline("Say hello in one word.")
        child.expect(r"Generation: \d+ tokens")  # answer finished, timings printed
        child.expect_exact("> ")
        child.sendline("Now tell me a very long story about a dragon.")
        # The line comes back (readline's display) before the answer: interrupt only once six words
        # follow the last copy of it (tokens are streaming).
        seen = ""
        while "dragon." not in seen or len(seen.rsplit("dragon.", 1)[-1].split()) < 6:
            child.expect(r"\S+\s+")
            seen += child.before + child.after
        child.sendintr()  # Ctrl-C mid-answer
        child.expect_exact("[interrupted]")
        child.expect_exact("> ")  # back at the prompt, program alive
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
        print(Path(tmp_path / "session.log").read_text())
    assert child.exitstatus == 0


def test_ctrl_d_and_commands_in_process(model, monkeypatch, capsys):
    """The interactive loop without a terminal: /help, /reset, an answer, then Ctrl-D (EOFError) quits."""
    import builtins

    from lstream.cli.run import interactive
    lines = iter(["/help", "", "Hi\\", "there", "/reset"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr(builtins, "input", fake_input)
    interactive(model, greedy(), None, 3)
    out = capsys.readouterr()
    assert "/reset" in out.out and "(conversation reset)" in out.out
    assert "Generation:" in out.err


def test_type_ahead_during_an_answer(tmp_path):
    """A line typed while an answer streams is not echoed into it; it becomes the next message,
    shown after the next prompt, and is answered."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(CLI[0], CLI[1:] + ["run", "--temp", "0", "-t", "1", "-c", "1024", "-n", "120",
                                             "-sys", "You are a storyteller."],
                          encoding="utf-8", timeout=180, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.logfile_read = open(tmp_path / "session.log", "w")
    try:
        child.expect_exact("> ")
        child.sendline("Tell me a very long story about a dragon.")
        seen = ""
        while "dragon." not in seen or len(seen.rsplit("dragon.", 1)[-1].split()) < 4:  # the answer streams
            child.expect(r"\S+\s+")
            seen += child.before + child.after
        child.sendline("What is the capital of France?")  # typed during the answer
        child.expect(r"Generation: \d+ tokens")  # the first answer ends
        answer = seen.rsplit("dragon.", 1)[-1] + child.before
        assert "capital" not in answer, answer  # not echoed into the answer
        child.expect_exact("> What is the capital of France?")  # the next message, as if typed there
        child.expect(r"Generation: \d+ tokens")  # and answered
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
        print(Path(tmp_path / "session.log").read_text())
    assert child.exitstatus == 0


def test_type_ahead_on_a_pseudo_terminal():
    """TypeAhead alone: echo off inside, finished lines kept in order, an unfinished one left for the
    line editor, echo back on after; Ctrl-D typed during the answer is kept as end of input."""
    import os
    import termios

    from lstream.cli.typeahead import TypeAhead
    master, slave = os.openpty()
    try:
        with open(slave, "rb", buffering=0, closefd=False) as term:
            with TypeAhead(term) as ta:
                assert not termios.tcgetattr(slave)[3] & termios.ECHO
                os.write(master, "first line\nsecond é\npartial".encode())
            assert ta.lines == ["first line", "second é"] and not ta.eof
            assert termios.tcgetattr(slave)[3] & termios.ECHO
            with TypeAhead(term) as ta:
                os.write(master, b"\n\x04")  # finish "partial", then Ctrl-D on an empty line
            assert ta.lines == ["partial"] and ta.eof
    finally:
        os.close(master)
        os.close(slave)
    with open(os.devnull) as null:
        assert TypeAhead(null).fd is None  # not a terminal: nothing to do
