"""Bad input at the command line: one line on stderr, exit status 1, no traceback."""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lstream.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def write_gguf(path, arch="llama", tensor_type=None):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_context_length(64)
    data = np.zeros((4, 32), np.float32)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", data)
    else:
        w.add_tensor("token_embd.weight", np.zeros((4, 84), np.uint8), raw_dtype=tensor_type)  # 4 Q2_K rows
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def cases(tmp_path_factory, smollm2_path):
    import gguf
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("hello, not a model\n")
    truncated = d / "truncated.gguf"
    with open(smollm2_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(40 << 20))  # header intact, tensor data cut short
    write_gguf(d / "mamba.gguf", arch="mamba")
    write_gguf(d / "q2k.gguf", tensor_type=gguf.GGMLQuantizationType.Q2_K)
    bad_version = d / "v9.gguf"
    bad_version.write_bytes(b"GGUF" + struct.pack("<I", 9) + b"\0" * 64)
    return d


@pytest.mark.parametrize("name,needles", [
    ("missing.gguf", ["no such file"]),
    ("notes.txt", ["not a GGUF file", "expected magic"]),
    ("truncated.gguf", ["truncated"]),
    ("mamba.gguf", ["unsupported architecture 'mamba'", "expected one of"]),
    ("q2k.gguf", ["unsupported tensor type Q2_K", "expected one of"]),
    ("v9.gguf", ["unsupported GGUF version", "found 9"]),
])
def test_bad_model_file(cases, name, needles):
    r = run_cli("run", "-m", str(cases / name), "-p", "hi", "-n", "1")
    assert_one_line_error(r, name, *needles)


def test_prompt_longer_than_context(smollm2_path):
    r = run_cli("run", "-m", str(smollm2_path), "-c", "8", "-p", "one two three four five six seven eight nine ten",
                "-n", "4")
    assert_one_line_error(r, "context", "-c")


def test_bad_bench_range():
    r = run_cli("bench", "-p", "8-x")
    assert r.returncode != 0 and "Traceback" not in r.stderr
