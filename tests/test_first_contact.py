"""Issue #17, first contact: the one rule for a missing GPU (backends/devices.py) in the rule itself,
the API and every command; parse-time checks of numeric flags; known model names; where load time
goes (run --verbose). The machine's own GPU is replaced by `available=` where the rule is tested."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from lstream.backends.devices import CLI_NAMES, NoDeviceError, NoGPUWarning, choose_device, cuda_available
from lstream.cli.main import cli

README = str(Path(__file__).resolve().parents[1] / "README.md")
NO_GPU = (False, "no GPU device found")
GPU = (True, "")


# -- the rule --------------------------------------------------------------------------------------

def test_rule_without_a_gpu():
    c = choose_device(0, available=NO_GPU)
    assert (c.device, c.n_gpu_layers, c.warning) == (None, 0, None)
    c = choose_device(8, available=NO_GPU)
    assert (c.device, c.n_gpu_layers) == (None, 0)
    assert c.warning == "no GPU here (no GPU device found): n_gpu_layers=8 ignored, every layer runs on the CPU"
    c = choose_device(10, [("blk\\.0\\.", "cpu")], names=CLI_NAMES, available=NO_GPU)
    assert c.warning.endswith("-ngl 10 ignored, every layer runs on the CPU") and c.overrides == (("blk\\.0\\.", "cpu"),)
    with pytest.raises(NoDeviceError, match=r"-ot output=cuda places tensors on a device"):
        choose_device(0, [("output", "cuda")], names=CLI_NAMES, available=NO_GPU)
    with pytest.raises(NoDeviceError, match=r"-ngl 999 with --no-fit cannot be honoured"):
        choose_device(999, no_fit=True, names=CLI_NAMES, available=NO_GPU)
    with pytest.raises(NoDeviceError, match=r"device='cuda' cannot be honoured"):
        choose_device(0, device="cuda", available=NO_GPU)
    assert choose_device(0, no_fit=True, available=NO_GPU).warning is None  # nothing asked of a GPU


def test_rule_with_a_gpu():
    assert choose_device(0, available=GPU).device == "cuda"  # -ngl 0 still streams prefill
    assert choose_device(0, device=None, available=GPU).device is None
    assert choose_device(4, device=None, available=GPU).device == "cuda"
    assert choose_device(4, device="CUDA0", available=GPU).device == "cuda:0"
    c = choose_device(999, [("output", "cuda")], no_fit=True, available=GPU)
    assert (c.device, c.n_gpu_layers, c.warning) == ("cuda", 999, None)
    with pytest.raises(ValueError):
        choose_device(4, device="cpu", available=GPU)


@pytest.mark.parametrize("bad", [dict(n_gpu_layers=-1), dict(overrides=[("x", "tpu")]), dict(device="metal")])
def test_rule_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        choose_device(available=NO_GPU, **bad)


# -- the API ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from lstream.tools.tiny_models import write_gguf
    return write_gguf(tmp_path_factory.mktemp("fc") / "tiny.gguf")


@pytest.mark.skipif(cuda_available(), reason="the machine without a GPU")
def test_api_without_a_gpu(tiny_gguf):
    import lstream
    with pytest.warns(NoGPUWarning, match="n_gpu_layers=8 ignored") as rec:
        m = lstream.load(str(tiny_gguf), n_gpu_layers=8, n_ctx=16, load_tokenizer=False, n_threads=1)
    assert rec[0].filename == __file__  # attributed to the caller's line, not the library's
    assert m.device_backend is None and {e.home for e in m.residency} == {"cpu"}
    assert m.eval([1, 2]).shape[-1] == m.config.vocab_size
    m.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing was asked of a GPU
        lstream.load(str(tiny_gguf), n_ctx=16, load_tokenizer=False).close()
    for kw in (dict(device="cuda"), dict(overrides=[("output", "cuda")]), dict(n_gpu_layers=3, no_fit=True)):
        with pytest.raises(NoDeviceError, match="no GPU here"):
            lstream.load(str(tiny_gguf), n_ctx=16, load_tokenizer=False, **kw)


@pytest.mark.parametrize("kw", [dict(n_ctx=0), dict(n_ubatch=0), dict(n_ubatch=-3), dict(n_threads=0)])
def test_api_refuses_sizes(tiny_gguf, kw):
    import lstream
    with pytest.raises(ValueError):
        lstream.load(str(tiny_gguf), load_tokenizer=False, **{"n_ctx": 16, **kw})


def test_unknown_model_names():
    import lstream
    from lstream.core.errors import ModelFormatError
    with pytest.raises(ModelFormatError, match=r"not a known model name: expected a path or one of gemma3-270m, "
                                               r"smollm2-135m \(default\); did you mean smollm2-135m\?"):
        lstream.load("smollm2")
    with pytest.raises(ModelFormatError, match=r"x\.gguf: no such file or directory$"):
        lstream.load("/nonexistent/x.gguf")


# -- the CLI ---------------------------------------------------------------------------------------

def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def test_pull_help_lists_every_known_model():
    from lstream.loaders.registry import KNOWN
    r = invoke("pull", "--help")
    assert r.exit_code == 0
    for name, km in KNOWN.items():
        assert name in r.output and km.filename in r.output
    r = invoke("pull", "nosuch")
    assert r.exit_code == 2 and "'nosuch' is not one of 'gemma3-270m', 'smollm2-135m'" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["run", "-ub", "0"], "0 is not in the range x>=1"),
    (["run", "-c", "-1"], "-1 is not in the range x>=0"),
    (["plan", "-t", "0"], "0 is not a thread count"),
    (["run", "-t", "-3"], "-3 is not a thread count"),
    (["info", "-ngl", "-2"], "-2 is not in the range x>=0"),
    (["run", "--temp", "nan"], "'nan' is not a finite number"),
    (["run", "--top-p", "1.5"], "1.5 is not in the range 0.0<=x<=1.0"),
    (["run", "--min-p", "2"], "2.0 is not in the range 0.0<=x<=1.0"),
    (["run", "--repeat-penalty", "0"], "0.0 is not in the range x>0.0"),
    (["run", "--seed", "-2"], "expected -1 (random) or 0 or more"),
    (["run", "-n", "-5"], "-5 is not in the range x>=-1"),
    (["perplexity", "-f", "README.md", "--chunks", "0"], "expected -1 (all chunks) or 1 or more"),
    (["perplexity", "-f", "README.md", "-c", "2"], "expected 0 (the model's training context) or 4 or more"),
    (["bench", "-ub", "0"], "expected values of 1 or more, found 0"),
    (["bench", "-t", "1,0"], "expected values of 1 or more, found 0"),
    (["bench", "-r", "0"], "0 is not in the range x>=1"),
    (["bench", "-nopo", "2"], "expected values of 0 to 1, found 2"),
    (["bench", "-pg", "0,0"], "not both 0"),
    (["bench", "-p", "1-100000"], "more than 4096 values"),
    (["bench", "--policy", "threshold,nope"], "found 'nope'"),
    (["plan", "--policy", "split:x"], "found 'split:x'"),
    (["plan", "-ot", "[=cpu"], "is not a regular expression"),
    (["plan", "-ot", "x=tpu"], "unknown device 'tpu'"),
])
def test_numeric_flags_checked_at_parse_time(args, needle):
    r = invoke(*[README if a == "README.md" else a for a in args])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and "Traceback" not in r.output, r.stderr


def test_more_threads_than_cpus_warns(monkeypatch):
    from lstream.backends import devices
    monkeypatch.setattr(devices, "cpu_count", lambda: 2)
    import lstream.cli.run as run_mod
    monkeypatch.setattr(run_mod, "load_model", lambda **kw: (_ for _ in ()).throw(ValueError("stop here")))
    r = invoke("run", "-t", "99", "-p", "hi")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == ["warning: -t 99 is more than the 2 CPUs here: 2 threads run", "error: stop here"]


def test_unknown_model_name_in_the_cli():
    r = invoke("run", "-m", "nosuchmodel", "-p", "hi")
    assert r.exit_code == 1
    assert r.stderr == ("error: nosuchmodel: no such file or directory, and not a known model name: expected a path "
                        "or one of gemma3-270m, smollm2-135m (default)\n")


@pytest.mark.skipif(cuda_available(), reason="the machine without a GPU")
def test_commands_without_a_gpu(tiny_gguf):
    m = str(tiny_gguf)
    r = invoke("info", "-m", m, "-ngl", "10")
    assert r.exit_code == 0 and "warning: no GPU here" in r.stderr
    assert "devices: cpu only (no GPU here: no GPU device found)" in r.stdout and "cuda" not in r.stdout.split("home")[1]
    r = invoke("plan", "-m", m, "-ngl", "10", "-ub", "8", "-v")
    assert r.exit_code == 0 and r.stderr.count("warning: no GPU here") == 1
    assert "no GPU here (no GPU device found): every op runs on the CPU" in r.stdout
    r = invoke("plan", "-m", m, "-ngl", "10", "--no-fit")
    assert r.exit_code == 1 and r.stderr.splitlines() == [
        "error: no GPU here (no GPU device found): -ngl 10 with --no-fit cannot be honoured (without it, every "
        "layer runs on the CPU)"]
    r = invoke("plan", "-m", m, "--policy", "cost")
    assert r.exit_code == 1 and "policy 'cost'" in r.stderr and "Traceback" not in r.output
    r = invoke("bench", "-m", m, "-ngl", "0,8,16", "-p", "4", "-n", "0", "-r", "1", "-t", "1", "-o", "csv")
    assert r.exit_code == 0, r.output
    assert "warning: no GPU here (no GPU device found): -ngl 8,16 ignored" in r.stderr
    assert len(r.stdout.strip().splitlines()) == 2  # header + one row, as -ngl 0
    r = invoke("bench", "-m", m, "-ot", "output=cuda", "-p", "4", "-n", "0")
    assert r.exit_code == 1 and r.stderr.startswith("error: no GPU here") and r.stdout == ""


def test_run_verbose_says_where_load_time_went(smollm2_path):
    r = invoke("run", "-m", str(smollm2_path), "-p", "Hi", "-n", "1", "-t", "1", "-c", "32", "--verbose")
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    file_line = next(ln for ln in lines if "model file time =" in ln)
    tok_line = next(ln for ln in lines if "tokenizer time =" in ln)
    rest_line = next(ln for ln in lines if "backend setup =" in ln)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in file_line and " ms " in file_line
    assert tok_line.endswith("(cache)") or "converted" in tok_line
    assert rest_line.endswith("(cpu)") or "cuda" in rest_line
    assert lines.index(file_line) < lines.index(next(ln for ln in lines if "load time =" in ln))
