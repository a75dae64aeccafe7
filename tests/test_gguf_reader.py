"""loaders.gguf's reader: gguf.GGUFReader with long metadata arrays (the vocabulary) read only when
asked for. Every field, once asked for, and every tensor must be what GGUFReader gives."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lstream.loaders.gguf import _open  # noqa: E402
from lstream.loaders.gguf_reader import LazyReader  # noqa: E402
from lstream.tools.errors_table import write_gguf  # noqa: E402

TOKENS = ["<unk>", "<s>", "", " ", "héllo", "日本語", "🙂👍🏽", "a" * 300, "<end_of_turn>", "\n\t"] + \
    [f"tok{i}" for i in range(2990)]


def _write(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_string("general.name", "reader test")
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("tokenizer.ggml.token_type", [i % 6 for i in range(len(TOKENS))])
    w.add_array("tokenizer.ggml.scores", [float(-i) for i in range(len(TOKENS))])
    w.add_array("tokenizer.ggml.merges", [f"t {i}" for i in range(1500)])
    w.add_array("short.strings", ["x", "yy", "zzz"])
    w.add_array("short.ints", [1, 2, 3])
    w.add_array("long.bools", [bool(i % 3) for i in range(1100)])
    w.add_array("long.empty_strings", [""] * 1030)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.ones(32, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same_field(a, b):
    assert (a.offset, a.name, a.data, a.types) == (b.offset, b.name, b.data, b.types)
    assert len(a.parts) == len(b.parts)
    for x, y in zip(a.parts, b.parts):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert a.contents() == b.contents()


@pytest.fixture(scope="module")
def file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("reader") / "r.gguf")


def test_fields_and_tensors_equal_gguf_reader(file):
    fast, ref = LazyReader(file), gguf.GGUFReader(file)
    assert fast.deferred == {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
                             "tokenizer.ggml.merges", "long.bools", "long.empty_strings"}
    assert list(fast.fields) == list(ref.fields)  # the keys, without reading anything
    assert fast.array_len("tokenizer.ggml.tokens") == len(TOKENS)
    assert fast.array_len("long.bools") == 1100 and fast.array_len("short.ints") == 3
    assert fast.array_len("general.name") is None and fast.array_len("missing") is None
    assert fast.string_index("tokenizer.ggml.tokens", "<end_of_turn>") == 8
    assert fast.string_index("tokenizer.ggml.tokens", "日本語") == 5
    assert fast.string_index("tokenizer.ggml.tokens", "") == 2
    assert fast.string_index("tokenizer.ggml.tokens", "absent") is None
    assert fast.string_index("short.strings", "zzz") == 2
    assert "tokenizer.ggml.tokens" in fast.deferred  # still unread
    for key in ref.fields:  # every way in completes a deferred field
        _same_field(fast.fields[key], ref.fields[key])
    assert not fast.deferred
    assert fast.string_index("tokenizer.ggml.tokens", "<end_of_turn>") == 8  # completed: same answer
    other = LazyReader(file)
    assert other.fields.get("tokenizer.ggml.merges").contents() == ref.fields["tokenizer.ggml.merges"].contents()
    assert dict(other.fields.items())["long.bools"].contents() == ref.fields["long.bools"].contents()
    assert fast.data_offset == ref.data_offset and len(fast.tensors) == len(ref.tensors)
    for x, y in zip(fast.tensors, ref.tensors):
        assert (x.name, x.tensor_type, x.n_bytes, x.data_offset) == (y.name, y.tensor_type, y.n_bytes, y.data_offset)
        assert np.array_equal(x.shape, y.shape) and np.array_equal(x.data, y.data)


def test_header_walk_hands_over_string_extents(file):
    r = _open(file)  # the checked open: _check_header's extents, no second walk of the strings
    assert r._string_arrays and r.array_len("tokenizer.ggml.merges") == 1500
    _same_field(r.fields["tokenizer.ggml.tokens"], gguf.GGUFReader(file).fields["tokenizer.ggml.tokens"])


def test_loader_on_a_tiny_model_matches(tmp_path):
    from lstream.loaders.model_file import load_model
    p = write_gguf(tmp_path / "tiny.gguf", meta={"general.name": "tiny"})
    m = load_model(p)
    assert m.config.name == "tiny" and m.metadata["general.name"] == "tiny"


def test_real_model_leaves_vocabulary_unread(smollm2_path):
    from lstream.loaders.model_file import load_model
    m = load_model(smollm2_path)
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"} <= m.handle.deferred
    assert m.config.vocab_size == 49152 and m.config.eos_ids == (2,)
    assert m.chat_template and "<|im_start|>" in m.chat_template
