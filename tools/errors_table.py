"""Every bad-model-file case lstream checks, the file that shows it, and the message it gets.

The cases are the ones tests/test_bad_input.py runs (each is a test); this script builds each
bad file, loads it, and prints the actual message as a markdown table for docs/errors.md:

    python -m lstream.tools.errors_table > docs/errors.md

Tiny models (2 llama layers, 32 wide, a few KB) are written here too, for the tests and the fuzzer.
"""
from __future__ import annotations

import json
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

E, F, H, V, N_LAYER = 32, 64, 2, 16, 2  # width, feed-forward, heads, vocabulary, layers

# -- a tiny llama GGUF, written with gguf.GGUFWriter --------------------------------------------


def _gguf_tensors(n_layer: int) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
    """(name, (rows, cols) or (n,), kind): kind "q" is Q8_0, "f" float32."""
    t = [("token_embd.weight", (V, E), "f"), ("output_norm.weight", (E,), "f")]
    for i in range(n_layer):
        t += [(f"blk.{i}.attn_norm.weight", (E,), "f"), (f"blk.{i}.ffn_norm.weight", (E,), "f")]
        t += [(f"blk.{i}.attn_{n}.weight", (E, E), "q") for n in ("q", "k", "v", "output")]
        t += [(f"blk.{i}.ffn_gate.weight", (F, E), "q"), (f"blk.{i}.ffn_up.weight", (F, E), "q"),
              (f"blk.{i}.ffn_down.weight", (E, F), "q")]
    return t


def write_gguf(path, arch: str = "llama", meta: dict | None = None, drop=(), shapes: dict | None = None,
               types: dict | None = None, n_layer: int = N_LAYER) -> Path:
    """A valid tiny llama GGUF, or one changed by: meta {key: value or None to leave out}, drop
    (tensor names left out), shapes {name: (rows, cols)}, types {name: GGMLQuantizationType}."""
    import gguf
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    kv = {f"{arch}.block_count": n_layer, f"{arch}.embedding_length": E, f"{arch}.feed_forward_length": F,
          f"{arch}.attention.head_count": H, f"{arch}.attention.head_count_kv": H, f"{arch}.context_length": 64,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, "general.name": "tiny"}
    kv.update(meta or {})
    for k, v in kv.items():
        if v is None:
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    rng = np.random.default_rng(0)
    for name, shape, kind in _gguf_tensors(n_layer):
        if name in drop:
            continue
        shape = (shapes or {}).get(name, shape)
        data = np.ones(shape, np.float32) if len(shape) == 1 else \
            (rng.standard_normal(shape) * 0.1).astype(np.float32)
        qt = (types or {}).get(name, gguf.GGMLQuantizationType.Q8_0 if kind == "q" else None)
        if qt is None or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qt in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
            w.add_tensor(name, gguf.quants.quantize(data, qt), raw_dtype=qt)
        else:  # a type lstream does not compute with: zero blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class HeaderField:
    kind: str  # tensor_count kv_count key_len value_type string_len scalar array_type array_len
    #            name_len n_dims dim tensor_type tensor_offset
    label: str  # the key or tensor it belongs to
    offset: int
    width: int  # bytes (4 or 8; scalars 1..8)


def gguf_header_fields(data: bytes) -> list[HeaderField]:
    """Where each count, length, type and offset of a (valid) GGUF header lies, for patching."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    out: list[HeaderField] = []
    off = 8

    def u(width, kind, label):
        nonlocal off
        out.append(HeaderField(kind, label, off, width))
        v = int.from_bytes(data[off:off + width], "little")
        off += width
        return v

    def string(kind, label):
        nonlocal off
        n = u(8, kind, label)
        s = data[off:off + n].decode()
        off += n
        return s

    def value(t, label):
        nonlocal off
        if t in sizes:
            u(sizes[t], "scalar", label)
        elif t == 8:
            string("string_len", label)
        else:
            it, n = u(4, "array_type", label), u(8, "array_len", label)
            for _ in range(n):
                value(it, label)

    n_t, n_kv = u(8, "tensor_count", ""), u(8, "kv_count", "")
    for _ in range(n_kv):
        key = string("key_len", "")
        out[-1].label = key
        value(u(4, "value_type", key), key)
    for _ in range(n_t):
        name = string("name_len", "")
        out[-1].label = name
        for _ in range(u(4, "n_dims", name)):
            u(8, "dim", name)
        u(4, "tensor_type", name)
        u(8, "tensor_offset", name)
    return out


def patch(data: bytes, kind: str, label: str, value: int, nth: int = 0) -> bytes:
    """The header field `kind` of `label` (the nth such) set to value."""
    f = [f for f in gguf_header_fields(data) if f.kind == kind and f.label == label][nth]
    return data[:f.offset] + value.to_bytes(f.width, "little") + data[f.offset + f.width:]


def field_offset(data: bytes, kind: str, label: str) -> int:
    return next(f.offset for f in gguf_header_fields(data) if f.kind == kind and f.label == label)


# -- a tiny llama safetensors directory ---------------------------------------------------------

ST_NP = {"F32": np.float32, "F16": np.float16}


def st_config(**over) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": E,
           "intermediate_size": F, "num_attention_heads": H, "num_key_value_heads": H,
           "num_hidden_layers": N_LAYER, "vocab_size": V, "max_position_embeddings": 64,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


def st_tensors(n_layer: int = N_LAYER) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": r(V, E), "model.norm.weight": np.ones(E, np.float32)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": np.ones(E, np.float32),
              p + "post_attention_layernorm.weight": np.ones(E, np.float32),
              p + "self_attn.q_proj.weight": r(E, E), p + "self_attn.k_proj.weight": r(E, E),
              p + "self_attn.v_proj.weight": r(E, E), p + "self_attn.o_proj.weight": r(E, E),
              p + "mlp.gate_proj.weight": r(F, E).astype(np.float16), p + "mlp.up_proj.weight": r(F, E),
              p + "mlp.down_proj.weight": r(E, F)}
    return t


def st_bytes(tensors: dict[str, np.ndarray], edit: Callable[[dict], None] | None = None,
             header_text: str | None = None) -> bytes:
    """A safetensors file: 8-byte header length, JSON header, data; edit(header) may change fields."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[a.dtype]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    if edit is not None:
        edit(header)
    text = header_text if header_text is not None else json.dumps(header)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def write_st_dir(d, config: dict | None = None, tensors: dict | None = None, data: bytes | None = None) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(st_config() if config is None else config))
    (d / "model.safetensors").write_bytes(st_bytes(st_tensors() if tensors is None else tensors)
                                          if data is None else data)
    return d


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
