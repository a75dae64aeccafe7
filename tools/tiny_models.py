"""Tiny models for the tests and the fuzzer: a 2-layer llama GGUF (32 wide, a few KB) written with
gguf.GGUFWriter, the same as a safetensors directory, and helpers that find and patch header
fields (tools/errors_table.py builds its bad files from these)."""
from __future__ import annotations

import json
import struct
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
