"""Every bad-model-file case lstream checks, the file that shows it, and the message it gets.

The cases are the ones tests/test_bad_input.py runs (each is a test); this script builds each
bad file, loads it, and prints the actual message as a markdown table for docs/errors.md:

    python -m lstream.tools.errors_table > docs/errors.md

The tiny models the bad files are made from are in tools/tiny_models.py.
"""
from __future__ import annotations

import json
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .tiny_models import (E, F, field_offset, patch, st_bytes, st_config, st_tensors,  # noqa: F401
                          write_gguf, write_st_dir)

# -- the cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    fmt: str  # gguf | safetensors
    what: str  # the bad input, in words
    build: Callable[[Path], Path]  # writes the bad file into a directory, returns what to load
    needles: tuple[str, ...]  # the message must contain each


def _g(name, make_bytes):
    """A GGUF case from the valid tiny file's bytes."""
    def build(d: Path) -> Path:
        base = write_gguf(d / "base.gguf").read_bytes()
        out = d / name
        out.write_bytes(make_bytes(base))
        return out
    return build


def _gw(name, **kw):
    return lambda d: write_gguf(d / name, **kw)


def _st(name, config=None, tensors=None, data=None, edit=None, header_text=None):
    def build(d: Path) -> Path:
        t = st_tensors() if tensors is None else tensors(st_tensors())
        raw = data(st_bytes(t)) if data else st_bytes(t, edit, header_text)
        return write_st_dir(d / name, config, data=raw)
    return build


def _st_dir(name, make):
    def build(d: Path) -> Path:
        p = write_st_dir(d / name)
        make(p)
        return p
    return build


def _set(key, field, value):
    def edit(h):
        h[key][field] = value
    return edit


def _drop(*names):
    return lambda t: {k: v for k, v in t.items() if k not in names}


Q = "blk.0.attn_q.weight"
K = "blk.0.attn_k.weight"
L0 = "model.layers.0."


def _q2k():
    import gguf
    return gguf.GGMLQuantizationType.Q2_K


def _dup_tensor(b: bytes) -> bytes:
    """Rename blk.0.attn_k.weight to blk.0.attn_q.weight in the header (same length)."""
    off = field_offset(b, "name_len", K) + 8
    return b[:off] + Q.encode() + b[off + len(K):]


def _rename_key(b: bytes, key: str, new: str) -> bytes:
    off = field_offset(b, "key_len", key)
    n = int.from_bytes(b[off:off + 8], "little")
    return b[:off] + struct.pack("<Q", len(new)) + new.encode() + b[off + 8 + n:]


CASES: list[Case] = [
    # -- GGUF ---------------------------------------------------------------------------------
    Case("gguf-missing", "gguf", "file does not exist", lambda d: d / "missing.gguf", ("no such file",)),
    Case("gguf-magic", "gguf", "wrong magic (a text file)",
         lambda d: (d / "notes.gguf").write_text("hello, not a model\n") and d / "notes.gguf",
         ("not a GGUF file", "expected magic b'GGUF'", "found b'hell'")),
    Case("gguf-empty", "gguf", "empty file", lambda d: (d / "empty.gguf").write_bytes(b"") or d / "empty.gguf",
         ("not a GGUF file", "found b''")),
    Case("gguf-version", "gguf", "unsupported version (9)",
         _g("v9.gguf", lambda b: b[:4] + struct.pack("<I", 9) + b[8:]), ("unsupported GGUF version", "expected 2 or 3", "found 9")),
    Case("gguf-short", "gguf", "header shorter than its fixed part (20 bytes)",
         _g("short.gguf", lambda b: b[:20]), ("truncated header", "expected at least 24 bytes", "found 20")),
    Case("gguf-truncated-header", "gguf", "truncated header (cut inside the metadata)",
         _g("cut_header.gguf", lambda b: b[:300]), ("truncated header", "needs", "left in the file")),
    Case("gguf-truncated-data", "gguf", "truncated tensor data (last 100 bytes cut)",
         _g("cut_data.gguf", lambda b: b[:-100]), ("truncated: tensor", "ends at byte", "file has")),
    Case("gguf-offset-beyond", "gguf", "tensor data offset beyond the end of the file",
         _g("far.gguf", lambda b: patch(b, "tensor_offset", Q, 1 << 40)), ("expected its data within", "found it at byte")),
    Case("gguf-tensor-count", "gguf", "header claims 2^60 tensors",
         _g("many_tensors.gguf", lambda b: patch(b, "tensor_count", "", 1 << 60)), ("header claims 1152921504606846976 tensors", "hold at most")),
    Case("gguf-kv-count", "gguf", "header claims 2^60 metadata entries",
         _g("many_kv.gguf", lambda b: patch(b, "kv_count", "", 1 << 60)), ("header claims 1152921504606846976 metadata entries",)),
    Case("gguf-string-length", "gguf", "string length 2^62 (general.name)",
         _g("long_string.gguf", lambda b: patch(b, "string_len", "general.name", 1 << 62)), ("truncated header", "value of general.name", "needs 4611686018427387904 bytes")),
    Case("gguf-key-length", "gguf", "metadata key length 2^63",
         _g("long_key.gguf", lambda b: patch(b, "key_len", "general.name", 1 << 63)), ("truncated header", "metadata key", "needs 9223372036854775808 bytes")),
    Case("gguf-array-length", "gguf", "array of 2^60 strings (tokenizer vocabulary)",
         lambda d: _long_array(d),
         ("header claims 1152921504606846976 items in array tokenizer.ggml.tokens",)),
    Case("gguf-value-type", "gguf", "unknown metadata value type (99)",
         _g("value_type.gguf", lambda b: patch(b, "value_type", "general.name", 99)), ("metadata general.name", "expected a value type 0..12", "found 99")),
    Case("gguf-dup-key", "gguf", "duplicate metadata key",
         _g("dup_key.gguf", lambda b: _rename_key(b, "llama.context_length", "llama.block_count")), ("duplicate metadata key llama.block_count",)),
    Case("gguf-dup-tensor", "gguf", "duplicate tensor names",
         _g("dup_tensor.gguf", _dup_tensor), ("duplicate tensor name blk.0.attn_q.weight",)),
    Case("gguf-overlap", "gguf", "overlapping tensors (two tensors at one offset)",
         _g("overlap.gguf", lambda b: patch(b, "tensor_offset", K, int.from_bytes(b[field_offset(b, "tensor_offset", Q):][:8], "little"))),
         ("overlap", "expected", "found")),
    Case("gguf-misaligned", "gguf", "tensor data offset not a multiple of the alignment",
         _g("misaligned.gguf", lambda b: patch(b, "tensor_offset", Q, int.from_bytes(b[field_offset(b, "tensor_offset", Q):][:8], "little") + 4)),
         ("expected a data offset aligned to 32 bytes",)),
    Case("gguf-alignment", "gguf", "general.alignment not a power of two (48)",
         _gw("align48.gguf", meta={"general.alignment": 48}), ("general.alignment", "expected a power of two", "found 48")),
    Case("gguf-n-dims", "gguf", "tensor with 7 dimensions",
         _g("dims7.gguf", lambda b: patch(b, "n_dims", Q, 7)), ("expected 1 to 4 dimensions", "found 7")),
    Case("gguf-zero-dim", "gguf", "tensor with a zero dimension",
         _g("dim0.gguf", lambda b: patch(b, "dim", "output_norm.weight", 0)), ("expected positive dimensions",)),
    Case("gguf-block", "gguf", "row length not a multiple of the type's block (Q8_0 row of 48)",
         _g("block.gguf", lambda b: patch(b, "dim", Q, 48)), ("row of 48 values is not a multiple of the Q8_0 block (32)",)),
    Case("gguf-type-unknown", "gguf", "tensor type id unknown (99)",
         _g("type99.gguf", lambda b: patch(b, "tensor_type", Q, 99)), ("unsupported tensor type 99", "expected one of")),
    Case("gguf-type-unsupported", "gguf", "tensor type lstream does not compute with (Q2_K)",
         lambda d: write_gguf(d / "q2k.gguf", shapes={Q: (E, 256)}, types={Q: _q2k()}),
         ("unsupported tensor type Q2_K", "expected one of")),
    Case("gguf-arch", "gguf", "unsupported architecture (mamba)", _gw("mamba.gguf", arch="mamba"),
         ("unsupported architecture 'mamba'", "expected one of")),
    Case("gguf-no-arch", "gguf", "no general.architecture",
         _g("no_arch.gguf", lambda b: _rename_key(b, "general.architecture", "general.architecturX")),
         ("no general.architecture",)),
    Case("gguf-missing-meta", "gguf", "required metadata missing (block_count)",
         _gw("no_blocks.gguf", meta={"llama.block_count": None}), ("missing metadata llama.block_count",)),
    Case("gguf-meta-type", "gguf", "metadata of the wrong type (embedding_length a string)",
         _gw("meta_str.gguf", meta={"llama.embedding_length": "wide"}), ("expected numbers", "found ValueError")),
    Case("gguf-zero-heads", "gguf", "zero attention heads", _gw("heads0.gguf", meta={"llama.attention.head_count": 0}),
         ("attention.head_count", "expected positive integers", "found 32 and 0")),
    Case("gguf-missing-tensor", "gguf", "tensor missing for the architecture",
         _gw("no_ffn_down.gguf", drop=("blk.1.ffn_down.weight",)), ("tensor blk.1.ffn_down.weight", "missing for architecture llama")),
    Case("gguf-config-width", "gguf", "config contradicts the tensors (embedding_length 64)",
         _gw("wide.gguf", meta={"llama.embedding_length": 64}), ("expected shape", "from the config", "found")),
    Case("gguf-config-layer", "gguf", "a later layer's tensor contradicts the config (blk.1.ffn_down transposed)",
         _gw("transposed.gguf", shapes={"blk.1.ffn_down.weight": (F, E)}),
         ("tensor blk.1.ffn_down.weight", "expected shape (32, 64)", "found (64, 32)")),
    Case("gguf-config-kv-heads", "gguf", "head_count_kv not dividing head_count (3)",
         _gw("kv3.gguf", meta={"llama.attention.head_count_kv": 3}), ("n_head_kv", "expected a divisor of n_head 2", "found 3")),
    Case("gguf-config-layers", "gguf", "block_count far beyond the tensors (10^6)",
         _gw("layers.gguf", meta={"llama.block_count": 10 ** 6}), ("n_layer", "expected at most one layer per tensor", "found 1000000")),
    # -- safetensors ---------------------------------------------------------------------------
    Case("st-no-config", "safetensors", "no config.json", _st_dir("no_config", lambda p: (p / "config.json").unlink()),
         ("not a model directory", "expected config.json")),
    Case("st-no-weights", "safetensors", "no .safetensors file", _st_dir("no_weights", lambda p: (p / "model.safetensors").unlink()),
         ("no model.safetensors",)),
    Case("st-bad-config", "safetensors", "config.json not JSON", _st_dir("bad_config", lambda p: (p / "config.json").write_text("{")),
         ("config.json", "unreadable config")),
    Case("st-short", "safetensors", "file shorter than the 8-byte header length", _st("short", data=lambda b: b[:4]),
         ("truncated safetensors header", "expected 8 bytes", "found 4")),
    Case("st-header-length", "safetensors", "header length 2^60 (beyond the file)",
         _st("long_header", data=lambda b: struct.pack("<Q", 1 << 60) + b[8:]), ("header length 1152921504606846976 exceeds the file",)),
    Case("st-header-json", "safetensors", "header not JSON", _st("not_json", header_text="{\"a\": "), ("header is not valid JSON",)),
    Case("st-header-object", "safetensors", "header a JSON list", _st("json_list", header_text="[1, 2]"), ("header is not a JSON object",)),
    Case("st-entry", "safetensors", "tensor entry malformed (shape a string)",
         _st("entry", edit=_set(L0 + "self_attn.q_proj.weight", "shape", "32x32")), ("expected {dtype, shape, data_offsets", "found")),
    Case("st-dtype-unknown", "safetensors", "unknown dtype (Q9)",
         _st("dtype_q9", edit=_set(L0 + "self_attn.q_proj.weight", "dtype", "Q9")), ("unsupported dtype Q9", "expected F32, F16 or BF16")),
    Case("st-dtype-unsupported", "safetensors", "dtype lstream does not compute with (I32)",
         _st("dtype_i32", edit=_set(L0 + "self_attn.q_proj.weight", "dtype", "I32")), ("unsupported dtype I32", "expected F32, F16 or BF16")),
    Case("st-offsets-size", "safetensors", "offsets that do not hold the shape",
         _st("offsets", edit=_set(L0 + "self_attn.q_proj.weight", "shape", [32, 16])), ("expected 2048 bytes for F32 (32, 16)", "found offsets")),
    Case("st-truncated", "safetensors", "truncated tensor data (last 100 bytes cut)", _st("truncated", data=lambda b: b[:-100]),
         ("truncated: tensor", "ends at byte", "file has")),
    Case("st-offset-beyond", "safetensors", "offsets beyond the end of the file",
         _st("beyond", edit=_set("model.norm.weight", "data_offsets", [1 << 40, (1 << 40) + 128])), ("truncated: tensor model.norm.weight",)),
    Case("st-overlap", "safetensors", "overlapping tensors",
         _st("overlap", edit=lambda h: h[L0 + "self_attn.k_proj.weight"].update(data_offsets=h[L0 + "self_attn.q_proj.weight"]["data_offsets"])),
         ("overlap", "expected", "found")),
    Case("st-dup", "safetensors", "duplicate tensor names in the header",
         _st("dup", header_text='{"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}, '
                                '"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [128, 256]}}'),
         ("duplicate tensor name model.norm.weight",)),
    Case("st-index-missing", "safetensors", "shard listed in the index missing",
         _st_dir("index_missing", lambda p: (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))),
         ("shard listed in the index is missing",)),
    Case("st-index-path", "safetensors", "index pointing outside the directory",
         _st_dir("index_path", lambda p: (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))),
         ("expected shard file names in the model directory", "found '../../etc/passwd'")),
    Case("st-arch", "safetensors", "unsupported architecture (mamba)",
         _st("mamba", config=st_config(model_type="mamba", architectures=["MambaForCausalLM"])), ("unsupported architecture 'mamba'", "expected one of")),
    Case("st-missing-tensor", "safetensors", "tensor missing for the architecture",
         _st("missing", tensors=_drop("model.layers.1.mlp.down_proj.weight")), ("tensor blk.1.ffn_down.weight", "missing for architecture llama")),
    Case("st-config-width", "safetensors", "config contradicts the tensors (hidden_size 64)",
         _st("wide", config=st_config(hidden_size=64)), ("expected shape", "from the config", "found")),
    Case("st-config-heads", "safetensors", "config with zero attention heads",
         _st("heads0", config=st_config(num_attention_heads=0)), ("config.json", "unreadable config", "ZeroDivisionError")),
]


def _long_array(d: Path) -> Path:
    """A GGUF with a tokenizer vocabulary whose array length claims 2^60 strings."""
    import gguf
    p = d / "long_array.gguf"
    w = gguf.GGUFWriter(str(d / "vocab.gguf"), "llama")
    w.add_token_list(["a", "b", "c"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p.write_bytes(patch((d / "vocab.gguf").read_bytes(), "array_len", "tokenizer.ggml.tokens", 1 << 60))
    return p


def message(case: Case, d: Path) -> tuple[type, str]:
    """(exception type, message with the temporary directory taken out) of loading the case."""
    from lstream.loaders.model_file import load_model
    path = case.build(d)
    try:
        load_model(path)
    except Exception as e:  # noqa: BLE001 - reported, the tests decide
        return type(e), str(e).replace(str(d) + "/", "")
    return type(None), "(loaded without error)"


def table() -> str:
    rows = ["| format | bad input | message (`lstream run -m FILE`: `error: <message>`, exit 1; API: `ModelFormatError`) |",
            "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(CASES):
            d = Path(tmp) / str(i)
            d.mkdir()
            kind, msg = message(c, d)
            if kind.__name__ != "ModelFormatError":
                msg = f"**{kind.__name__}**: {msg}"
            msg = msg.replace("|", "\\|")
            rows.append(f"| {c.fmt} | {c.what} | `{msg}` |")
    return "\n".join(rows)


def main() -> None:
    print("# Bad model files and the messages they get\n")
    print("Generated by `python -m lstream.tools.errors_table` from the cases in "
          "`tools/errors_table.py`; each row is a test in `tests/test_bad_input.py`. Shapes that are not a "
          "multiple of a block cannot occur in safetensors (F32/F16/BF16 have a block of 1).\n")
    print(table())


if __name__ == "__main__":
    sys.exit(main())
