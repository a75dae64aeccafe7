"""The README's examples run as written: every shell line of its ```sh blocks that needs neither an
install, the test suite itself nor the 4 GiB synthetic GPU model, and its Python API snippet, each
ends with exit 0 and no traceback. Sizes are made small so that it is quick (-p/-n/-r/-pg/-d/
--chunks; an interactive `run` gets one line on stdin). On a machine without a GPU, an example with
GPU layers prints its one warning line instead."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lstream.backends.devices import cuda_available

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text()
SKIP = ("pip install", "pytest", "l8b.gguf")  # installs, the suite itself, the GPU section's 4 GiB model
GPU = cuda_available()


def shell_examples() -> list[str]:
    out = []
    for block in re.findall(r"```sh\n(.*?)```", TEXT, re.S):
        block = re.sub(r"\\\n\s*", "", block)  # a line continued with a backslash is one command
        for line in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()  # a trailing comment
            if line and not line.startswith("#") and not any(s in line for s in SKIP) and line not in out:
                out.append(line)
    return out


def _sub(line: str, flag: str, value: str, keep_zero: bool = True) -> str:
    """`flag N` -> `flag value` (a 0 stays 0 where keep_zero)."""
    def rep(m):
        return m[0] if keep_zero and m[2] == "0" else f"{m[1]}{value}"
    return re.sub(rf"(\s{re.escape(flag)}\s+)(\S+)", rep, line)


def quick(line: str) -> tuple[str, str | None]:
    """The example with small sizes, as a shell line; stdin for an interactive run."""
    stdin = None
    m = re.search(r"\s[|>]", line)  # flags go before a pipe or a redirection
    line, tail = (line[:m.start()], line[m.start():]) if m else (line, "")
    words = line.split()
    if words[:2] == ["lstream", "run"]:
        if " -p " not in line and " -f " not in line:
            stdin = "Hi\n"
        line = _sub(line, "-n", "4") if " -n " in line else line + " -n 4"
    if words[:2] == ["lstream", "bench"]:
        line = _sub(_sub(_sub(_sub(line, "-p", "8"), "-n", "4"), "-pg", "8,4"), "-d", "0,16", keep_zero=False)
        if not re.search(r"\s-(p|n|pg)\s", line):
            line += " -p 8 -n 4"
        line = _sub(line, "-r", "1", keep_zero=False) if " -r " in line else line + " -r 1"
    if words[:2] == ["lstream", "perplexity"]:
        line += " --chunks 2"
    if words[:2] == ["python", "tools/load_test.py"] and "--base-url" in line:
        line = _sub(_sub(_sub(line, "-c", "1,2"), "-r", "1"), "-n", "4")
    line += tail
    if shutil.which("sqlite3") is None:
        line = line.replace("| sqlite3 bench.db", "| python -c \"import sqlite3, sys; "
                                                  "sqlite3.connect('bench.db').executescript(sys.stdin.read())\"")
    line = re.sub(r"^lstream ", f"{sys.executable} -m lstream.cli ", line)
    line = re.sub(r"(^|\| )python ", rf"\1{sys.executable} ", line)
    return line, stdin


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("readme")
    for name in ("tests", "tools"):  # the README's paths are relative to the repository's root
        (d / name).symlink_to(ROOT / name)
    return d


DONE: dict[int, subprocess.CompletedProcess] = {}
SERVER: dict[str, subprocess.Popen] = {}
SERVE_URL = "http://127.0.0.1:8080"


def _start_server(cmd: str, workdir: Path) -> subprocess.CompletedProcess:
    """`lstream serve` runs until stopped: started in the background, ready once /health answers;
    the examples that talk to it run against it, and it is stopped (SIGINT, exit 0) at the end."""
    import time
    import urllib.request
    proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    SERVER["proc"] = proc
    t_end = time.time() + 300
    while time.time() < t_end and proc.poll() is None:
        try:
            with urllib.request.urlopen(SERVE_URL + "/health", timeout=2) as r:
                if r.status == 200:
                    return subprocess.CompletedProcess(cmd, 0, "", "")
        except OSError:
            time.sleep(1)
    out, err = (proc.communicate(timeout=30) if proc.poll() is not None else ("", "not ready in 300 s"))
    return subprocess.CompletedProcess(cmd, proc.returncode if proc.returncode is not None else 1, out, err)


@pytest.fixture(scope="module", autouse=True)
def stop_server():
    yield
    proc = SERVER.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.send_signal(2)
        proc.communicate(timeout=60)


def run_example(i: int, workdir: Path) -> subprocess.CompletedProcess:
    if i not in DONE:
        line = EXAMPLES[i]
        if "127.0.0.1:8080" in line and not line.startswith("lstream serve"):
            run_example(next(j for j, e in enumerate(EXAMPLES) if e.startswith("lstream serve")), workdir)
        for j, other in enumerate(EXAMPLES[:i]):  # what it reads (bench.json) is written first
            m = re.search(r">\s*(\S+)", other)
            if m and m[1] in line:
                run_example(j, workdir)
        cmd, stdin = quick(line)
        if line.startswith("lstream serve"):
            DONE[i] = _start_server(cmd, workdir)
            return DONE[i]
        DONE[i] = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=workdir, input=stdin,
                                 capture_output=True, text=True, timeout=600)
    return DONE[i]


EXAMPLES = shell_examples()


def _gpu_layers(line: str) -> bool:
    m = re.search(r"-ngl\s+(\S+)", line)
    return bool(m) and any(v.isdigit() and int(v) > 0 for v in m[1].split(","))


@pytest.mark.parametrize("i", range(len(EXAMPLES)), ids=[e[:60] for e in EXAMPLES])
def test_shell_example(i, workdir):
    r = run_example(i, workdir)
    what = f"{quick(EXAMPLES[i])[0]}\nexit {r.returncode}\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}"
    assert r.returncode == 0, what
    assert "Traceback" not in r.stderr and "error:" not in r.stderr, what
    if _gpu_layers(EXAMPLES[i]) and not GPU:
        assert r.stderr.count("warning: no GPU here") == 1, what


def test_every_command_of_the_readme_is_covered():
    cmds = {e.split()[1] for e in EXAMPLES if e.startswith("lstream ")}
    assert cmds == {"run", "bench", "perplexity", "info", "plan", "pull", "serve"}, cmds
    assert any(e.startswith("python tools/plot_bench.py") for e in EXAMPLES)


def test_python_api_snippet(workdir):
    code = next(c for c in re.findall(r"```python\n(.*?)```", TEXT, re.S) if "import lstream" in c)
    for old, new in (("n_prompt=512, n_gen=128, reps=3", "n_prompt=8, n_gen=4, reps=1"),
                     ("n_predict=64", "n_predict=8"), ("n_predict=32", "n_predict=8"), ("n_predict=16", "n_predict=8"),
                     (".read()", ".read()[:2500]")):
        assert old in code, old
        code = code.replace(old, new)
    (workdir / "snippet.py").write_text(code)
    r = subprocess.run([sys.executable, "snippet.py"], cwd=workdir, capture_output=True, text=True, timeout=600)
    what = f"exit {r.returncode}\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}"
    assert r.returncode == 0 and "Traceback" not in r.stderr, what
    if not GPU:  # n_gpu_layers=8 here: the one warning (Python prints it with its source line)
        assert r.stderr.count("NoGPUWarning: no GPU here") == 1, what
    out = r.stdout.splitlines()
    assert "Paris" in out[0], what  # generate's answer alone on its line
    assert len(out) >= 5 and out[-1].split() and out[-1].split()[0].isdigit(), what  # plan's bytes, last
