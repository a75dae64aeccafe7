"""Fuzzing the loaders: a valid tiny GGUF (written with gguf.GGUFWriter) and a tiny safetensors
directory, changed byte by byte and field by field. Loading may fail, but only with lstream's own
errors (LStreamError), and each case within CASE_SECONDS. The number of cases run is printed
("fuzz cases: N") in the test output; LSTREAM_FUZZ_SCALE=10 runs ten times as many."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstream.core.errors import LStreamError
from lstream.loaders.model_file import load_model
from lstream.tools.tiny_models import gguf_header_fields, st_bytes, st_config, st_tensors, write_gguf, write_st_dir

CASE_SECONDS = 10.0  # generous: the machine running CI may be loaded; a hang is what this catches
SCALE = int(os.environ.get("LSTREAM_FUZZ_SCALE", "1"))
COUNTS: dict[str, int] = {}


def fuzz_settings(n: int):
    return settings(max_examples=n * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
                    suppress_health_check=list(HealthCheck), print_blob=True)


class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"a fuzz case ran longer than {CASE_SECONDS} s")


def load_bounded(path, test: str) -> None:
    """Load; an LStreamError is an accepted outcome, anything else fails the test."""
    COUNTS[test] = COUNTS.get(test, 0) + 1
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        load_model(path)
    except LStreamError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, request):
    t0 = time.perf_counter()
    d = tmp_path_factory.mktemp("fuzz")
    gguf_base = write_gguf(d / "base.gguf").read_bytes()
    st_dir = write_st_dir(d / "st")
    yield d, gguf_base, st_dir
    line = (f"fuzz cases: {sum(COUNTS.values())} ("
            + ", ".join(f"{k} {v}" for k, v in COUNTS.items()) + f") in {time.perf_counter() - t0:.1f} s")
    print("\n" + line)
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cm = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and cm is not None:
        with cm.global_and_fixture_disabled():  # shown in CI's `pytest -q` output, not only with -s
            tr.write("\n" + line + "\n")


def mutations(size: int, header: int):
    """(position, byte) edits, most in the header (where the structure is), some anywhere."""
    pos = st.one_of(st.integers(0, max(header - 1, 0)), st.integers(0, size - 1))
    return st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=8)


def apply(data: bytes, edits, cut: int | None) -> bytes:
    b = bytearray(data)
    for p, v in edits:
        b[p] = v
    return bytes(b[:cut] if cut is not None else b)


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 255, 256, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1,
               2**32, 2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@given(data=st.data())
@fuzz_settings(400)
def test_fuzz_gguf_bytes(bases, data):
    d, base, _ = bases
    header = gguf_header_fields(base)[-1].offset + 8
    edits = data.draw(mutations(len(base), header))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(base))))
    p = d / "bytes.gguf"
    p.write_bytes(apply(base, edits, cut))
    load_bounded(p, "gguf bytes")


@given(data=st.data())
@fuzz_settings(300)
def test_fuzz_gguf_fields(bases, data):
    """Counts, lengths, types, dimensions and offsets of the header set to edge values."""
    d, base, _ = bases
    fields = gguf_header_fields(base)
    b = bytearray(base)
    for f in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3)):
        top = (1 << (8 * f.width)) - 1
        v = data.draw(st.one_of(st.sampled_from([x for x in INTERESTING if x <= top]), st.integers(0, top),
                                st.integers(-8, 8).map(lambda k, f=f: max(0, int.from_bytes(
                                    base[f.offset:f.offset + f.width], "little") + k) & top)))
        b[f.offset:f.offset + f.width] = v.to_bytes(f.width, "little")
    p = d / "fields.gguf"
    p.write_bytes(bytes(b))
    load_bounded(p, "gguf fields")


@given(data=st.data())
@fuzz_settings(150)
def test_fuzz_safetensors_bytes(bases, data):
    d, _, st_dir = bases
    base = (st_dir / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(base[:8], "little")
    edits = data.draw(mutations(len(base), header))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(base))))
    (st_dir / "model.safetensors").write_bytes(apply(base, edits, cut))
    try:
        load_bounded(st_dir, "safetensors bytes")
    finally:
        (st_dir / "model.safetensors").write_bytes(base)


JSONISH = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.sampled_from(INTERESTING),
                    st.text(max_size=8), st.floats(allow_nan=True), st.lists(st.integers(-4, 2**40), max_size=4))


@given(data=st.data())
@fuzz_settings(200)
def test_fuzz_safetensors_fields(bases, data):
    """Header entries (dtype, shape, data_offsets, names) and config.json fields set to odd values."""
    d, _, _ = bases
    tensors = st_tensors()
    names = list(tensors)

    def edit(h):
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from(names))
            what = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename", "entry"]))
            if what == "drop":
                h.pop(name, None)
            elif what == "rename" and name in h:
                h[data.draw(st.sampled_from(names + ["__metadata__", ""]))] = h.pop(name)
            elif what == "entry":
                h[name] = data.draw(JSONISH)
            elif isinstance(h.get(name), dict):
                h[name][what] = data.draw(st.one_of(JSONISH, st.sampled_from(["F32", "F16", "BF16", "I64", "U8"])))

    cfg = st_config()
    for key in data.draw(st.lists(st.sampled_from(["hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_key_value_heads", "num_hidden_layers", "vocab_size",
                                                   "model_type", "head_dim", "rms_norm_eps"]), max_size=2)):
        cfg[key] = data.draw(JSONISH)
    out = d / "st_fields"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes(st_bytes(tensors, edit))
    load_bounded(out, "safetensors fields")
