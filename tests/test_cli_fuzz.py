"""Fuzzing the command line: every command with random combinations of flags and values (good and
bad, GPU flags included on a machine without a GPU) ends with exit status 0, 1 or 2, never a
traceback, never an internal error, and an error line never shares a line with earlier output.

In process through click's CliRunner (fast) on a tiny synthetic model (tools/synth_model.py's
"tiny" preset, with its byte-level tokenizer), within BUDGET_S per command; a few cases through
the real entry point in a subprocess. `pull` is fuzzed only with names whose file is already in
the cache (no network) and unknown names. LSTREAM_FUZZ_SCALE=10 runs ten times as many cases;
LSTREAM_FUZZ_VERBOSE=1 prints each case (with pytest -s)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstream.backends.devices import cuda_available
from lstream.cli.main import cli
from lstream.loaders.registry import KNOWN, cache_dir

SCALE = int(os.environ.get("LSTREAM_FUZZ_SCALE", "1"))
BUDGET_S = 30.0 * SCALE  # per command, once warm; a case started in time finishes
CASE_SECONDS = 120.0  # a hang is what this catches (the machine running CI may be loaded)
COUNTS: dict[str, int] = {}
EXITS: dict[str, dict[int, int]] = {}  # per command: exit status -> cases
GPU = cuda_available()


def fuzz_settings(n: int):
    return settings(max_examples=n * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model (kept in the cache folder, so its converted tokenizer is cached once), a
    short text, an empty file and a binary one."""
    from lstream.tools.synth_model import write_model
    model = cache_dir() / "tests" / "tiny-q8_0.gguf"
    if not model.exists():
        part = model.with_suffix(f".{os.getpid()}.part")
        write_model(part, "tiny", "Q8_0")
        part.rename(model)
    d = tmp_path_factory.mktemp("cli_fuzz")
    (d / "text.txt").write_text("We hold these truths to be self-evident, that all men are created equal.\n")
    (d / "empty.txt").write_text("")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    f = {"model": str(model), "text": str(d / "text.txt"), "empty": str(d / "empty.txt"),
         "binary": str(d / "binary.bin"), "missing": str(d / "missing.txt"), "dir": str(d)}
    for argv in (["run", "-m", f["model"], "-p", "hi", "-n", "2", "-c", "16", "-t", "1"],
                 ["perplexity", "-m", f["model"], "-f", f["text"], "-c", "16", "--chunks", "1", "-t", "1"],
                 ["bench", "-m", f["model"], "-p", "4", "-n", "2", "-r", "1", "-t", "1"]):
        r = CliRunner().invoke(cli, argv)  # warm-up: compiles, converts the tokenizer (outside the budget)
        assert r.exit_code == 0, (argv, r.output, r.exception)
    return f


class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"a CLI fuzz case ran longer than {CASE_SECONDS} s")


def check(argv: list[str], stdin: str | None = None) -> int:
    """One invocation: exit 0, 1 or 2; no traceback, no internal error; errors on their own line;
    GPU layers without a GPU: the one warning line."""
    t0 = time.monotonic()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        r = CliRunner().invoke(cli, argv, input=stdin)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    what = f"lstream {' '.join(map(repr, argv))}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{what}\nraised {r.exception!r}"
    assert r.exit_code in (0, 1, 2), what
    assert "Traceback" not in r.output and "internal error" not in r.stderr, what
    assert "NoGPUWarning" not in r.stderr, what  # the CLI prints the rule's line, not Python's warning
    if r.exit_code == 1 and r.stderr.strip():
        assert r.stderr.strip().splitlines()[-1].startswith("error: "), what
        assert r.stdout == "" or r.stdout.endswith("\n"), what  # the error starts a line of its own
    if r.exit_code == 0 and not GPU and _gpu_layers(argv) and argv[0] in ("run", "plan", "perplexity", "info", "bench"):
        assert "warning: no GPU here" in r.stderr, what
    if os.environ.get("LSTREAM_FUZZ_VERBOSE") == "1":  # each case: status, seconds, argv, last stderr line
        print("case", r.exit_code, f"{time.monotonic() - t0:.2f}", argv, (r.stderr.strip().splitlines() or [""])[-1][:150])
    return r.exit_code


def _gpu_layers(argv: list[str]) -> bool:
    for i, a in enumerate(argv[:-1]):
        if a in ("-ngl", "--n-gpu-layers"):
            return any(v.strip().lstrip("-").isdigit() and int(v) > 0 for v in argv[i + 1].split(","))
    return False


ENDS: dict[str, float] = {}


def run_case(name: str, argv: list[str], stdin: str | None = None) -> None:
    """check() while the command's budget lasts (counted from its first case)."""
    end = ENDS.setdefault(name, time.monotonic() + BUDGET_S)
    if time.monotonic() > end:
        return
    COUNTS[name] = COUNTS.get(name, 0) + 1
    code = check(argv, stdin)
    EXITS.setdefault(name, {}).setdefault(code, 0)
    EXITS[name][code] += 1


def pick(data, good, bad=()):
    """A good value, or now and then (about 1 in 8) a bad one (not on hypothesis's favourite
    boundary values, which it draws more often)."""
    if bad and data.draw(st.integers(0, 7)) == 3:
        return data.draw(st.sampled_from(list(bad)))
    return data.draw(st.sampled_from(list(good)))


def opt(data, flag: str, good, bad=()) -> list[str]:
    """The flag with a value (None: a bare flag), or nothing."""
    if not data.draw(st.booleans()):
        return []
    v = pick(data, good, bad)
    return [flag] if v is None else [flag, str(v)]


def model_arg(data, f) -> list[str]:
    return ["-m", pick(data, [f["model"]], ["nosuchmodel", "smollm2", f["missing"] + ".gguf", f["text"], f["dir"]])]


def model_flags(data) -> list[str]:
    """-ngl -t -ub -ot --policy --threshold -nopo --no-fit --no-cuda-graphs --quantize (not -c: callers)."""
    return (opt(data, "-ngl", [0, 1, 2, 999], [-1, "x"]) + opt(data, "-t", [1, 1, 1, 2, 99], [0, -3, "two"])
            + opt(data, "-ub", [1, 3, 8, 512], [0, -2])
            + opt(data, "-ot", ["blk\\.0\\..*=cpu", "output=CPU"],
                  ["output=cuda", "blk=CUDA0", "x=foo", "[=cpu", "noeq", "=cpu"])
            + opt(data, "--policy", ["auto", "threshold", "never", "always", "split:1"], ["split:x", "cost", "bogus"])
            + opt(data, "--threshold", [0, 1, 32], [-1]) + opt(data, "-nopo", [0, 1], [2])
            + opt(data, "--no-fit", [None]) + opt(data, "--no-cuda-graphs", [None])
            + opt(data, "--quantize", ["q8_0"], ["q5_0"]))


def shuffled(data, argv: list[list[str]]) -> list[str]:
    groups = data.draw(st.permutations(argv))
    return [a for g in groups for a in g]


RUN_FLAGS = (("--temp", [0, 0.7], [-1, "nan", "inf", "x"]), ("--top-k", [0, 5], [-3]),
             ("--top-p", [0, 0.5, 1], [1.5]), ("--min-p", [0, 0.1, 1], [2]), ("--repeat-penalty", [1, 1.1], [0, -1]),
             ("--seed", [-1, 0, 7], [-2]), ("-sys", ["Be brief."], ()), ("-cnv", [None], ()),
             ("-no-cnv", [None], ()), ("--verbose", [None], ()), ("--profile", [None], ()))


@given(data=st.data())
@fuzz_settings(60)
def test_fuzz_run(files, data):
    name = "run"
    n = pick(data, [0, 1, 2, 3, 8, -1], [-2])
    ctx = pick(data, [2, 8, 16, 32] + ([0, 64] if n >= 0 else []), [1, -1])  # -n -1: up to -c tokens
    groups = [model_arg(data, files), ["-n", str(n)], ["-c", str(ctx)], model_flags(data)]
    groups += [opt(data, flag, good, bad) for flag, good, bad in RUN_FLAGS]
    mode = data.draw(st.sampled_from(["prompt", "prompt", "file", "chat"]))
    stdin = None
    if mode == "prompt":
        groups.append(["-p", pick(data, ["hi", "Once upon a time", "é漢字 🙂", "a\\b", "-"], [""])])
    elif mode == "file":
        groups.append(["-f", pick(data, [files["text"]], [files["missing"], files["empty"], files["binary"], files["dir"]])])
    else:
        stdin = data.draw(st.sampled_from(["Hi\n", "/help\n/reset\nHello\\\nthere\n/exit\n", "\n\n", "/bogus\n", ""]))
    run_case(name, ["run"] + shuffled(data, groups), stdin)


BENCH_FLAGS = (("-pg", ["4,2", "0,2"], ["0,0", "x", "4"]), ("-d", ["0", "4", "0,2"], ["-1"]),
               ("-b", ["1", "8"], ["0"]), ("-ub", ["1", "4", "1-4*2"], ["0"]),
               ("-ngl", ["0", "0,8", "99", "0-2"], ["-1"]), ("-t", ["1", "1", "1,2", "99"], ["0"]),
               ("-nopo", ["0", "1"], ["2"]), ("-fa", ["0", "1"], ["2"]),
               ("-ot", ["blk=cpu"], ["output=cuda", "x=foo", "[=cpu", "a=cpu;b=cuda"]),
               ("--policy", ["threshold,never", "split:1", "auto"], ["cost", "bogus", "split:"]),
               ("--threshold", ["1", "32", "1,64"], ["0", "-1"]),
               ("-o", ["md", "csv", "json", "jsonl", "sql", "none"], ["xml"]), ("-oe", ["md", "json", "none"], ()),
               ("--progress", [None], ()), ("-v", [None], ()), ("--no-warmup", [None], ()),
               ("--profile", [None], ()), ("--no-layer-major", [None], ()))


@given(data=st.data())
@fuzz_settings(60)
def test_fuzz_bench(files, data):
    name = "bench"
    groups = [model_arg(data, files), ["-p", pick(data, ["0", "1", "4", "1-4", "4-1", "1-8*2", "2,4"],
                                                  ["8-x", "-3", "1-8*1"])],
              ["-n", pick(data, ["0", "1", "2", "1-2"], ["-1"])], ["-r", pick(data, ["1", "1", "2"], ["0", "-1"])]]
    groups += [opt(data, flag, good, bad) for flag, good, bad in BENCH_FLAGS]
    run_case(name, ["bench"] + shuffled(data, groups))


@given(data=st.data())
@fuzz_settings(40)
def test_fuzz_perplexity(files, data):
    name = "perplexity"
    groups = [model_arg(data, files), model_flags(data),
              ["-f", pick(data, [files["text"]], [files["missing"], files["empty"], files["binary"]])],
              ["-c", pick(data, ["4", "16", "32"], ["0", "1", "3", "-4"])],
              opt(data, "--chunks", ["-1", "1", "2"], ["0", "-5"]), opt(data, "--profile", [None])]
    run_case(name, ["perplexity"] + shuffled(data, groups))


@given(data=st.data())
@fuzz_settings(60)
def test_fuzz_info_plan_pull(files, data):
    name = "info/plan/pull"
    cmd = data.draw(st.sampled_from(["info", "plan", "plan", "pull", "help", "nosuchcommand"]))
    if cmd == "info":
        argv = ["info"] + shuffled(data, [model_arg(data, files), opt(data, "-ngl", [0, 4, 999], [-1, "x"]),
                                          opt(data, "--tensors", [None])])
    elif cmd == "plan":
        argv = ["plan"] + shuffled(data, [model_arg(data, files), model_flags(data), opt(data, "-v", [None]),
                                          opt(data, "-c", [0, 16], [1, -1])])
    elif cmd == "pull":  # known names only when their file is here: never the network
        cached = [n for n, km in KNOWN.items() if (cache_dir() / km.filename).exists()]
        argv = ["pull"] + [pick(data, cached + ["--help"], ["nosuch", ""])]
    elif cmd == "help":
        argv = [data.draw(st.sampled_from(["run", "bench", "perplexity", "info", "plan", "pull"])), "--help"]
    else:
        argv = [data.draw(st.sampled_from(["nosuchcommand", "--version", "-x"]))]
    run_case(name, argv)


def test_fuzz_ran_enough():
    """The budgets left room for real cases (not a vacuous pass)."""
    for name, n in COUNTS.items():
        print(f"cli fuzz cases: {name} {n}, by exit status {dict(sorted(EXITS[name].items()))}")
        assert n >= 5 and EXITS[name].get(0, 0) >= 1, (COUNTS, EXITS)


# -- the real entry point ---------------------------------------------------------------------------

def lstream(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lstream.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(GPU, reason="checks the machine without a GPU")
def test_subprocess_gpu_flags_without_gpu(files):
    m = files["model"]
    r = lstream("run", "-m", m, "-p", "hi", "-n", "2", "-c", "16", "-t", "1", "-ngl", "4")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == \
        ["warning: no GPU here (no GPU device found): -ngl 4 ignored, every layer runs on the CPU"] or \
        r.stderr.count("warning: no GPU here") == 1, r.stderr
    r = lstream("plan", "-m", m, "-ot", "blk=cuda")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: no GPU here"), r.stderr
    r = lstream("perplexity", "-m", m, "-f", files["text"], "-c", "16", "-ngl", "999", "--no-fit")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "--no-fit" in lines[0], r.stderr


def test_subprocess_error_after_the_echoed_prompt(files):
    """The prompt is echoed, then the context is full: the error starts a new line."""
    r = lstream("run", "-m", files["model"], "-p", "hello", "-n", "2", "-c", "2", "-t", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "hello\n", repr(r.stdout)
    assert r.stderr.startswith("error: context full"), r.stderr


def test_subprocess_usage_errors(files):
    for args in (["run", "-ub", "0"], ["bench", "-t", "0"], ["perplexity", "-f", files["text"], "--chunks", "0"],
                 ["pull", "nosuch"], ["run", "--temp", "nan"]):
        r = lstream(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "Error: " in r.stderr, (args, r.stderr)
