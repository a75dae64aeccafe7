"""GGUF loader: gguf.GGUFReader over a memory map; tensors stay zero-copy views of the file."""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

from ..core.config import ModelConfig
from ..core.errors import ModelFormatError
from ..core.qtypes import QTYPE_INFO, QType, tensor_bytes
from ..core.residency import ResidencyMap, State, TensorEntry
from .names import layer_of
from .loaded import LoadedModel

# Types the engine computes with; others are rejected at load with a clear message.
SUPPORTED_QTYPES = frozenset({QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0,
                              QType.Q5_1, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K})
NEOX_ARCHS = {"qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma3", "gemma2", "phi3"}
# MoE architectures whose top-k routing weights are not renormalized when the file does not say
# (llama.cpp: qwen2moe passes norm_w=false; Mixtral (llama) and qwen3moe renormalize)
_EXPERT_NO_NORM = {"qwen2moe"}  # rotate halves; llama rotates pairs
GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32
# GGUF value types: 0-7 and 10-12 scalars (byte sizes), 8 string, 9 array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


class _Cursor:
    """Reads a GGUF header with every length checked against the bytes that are left."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.off = path, buf, size, 8
        self.string_arrays: dict[int, int] = {}  # offset of the first string -> end of the last

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.off:
            raise ModelFormatError(self.path, f"truncated header: {what} needs {n} bytes at offset {self.off}, "
                                              f"found {self.size - self.off} left in the file")
        off, self.off = self.off, self.off + n
        return off

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        off = self.take(n, what)
        return bytes(self.buf[off:off + n])

    def unique_name(self, what: str, seen: set, bad_utf8: str, duplicate: str) -> str:
        """A UTF-8 string not seen before (metadata keys, tensor names), else a one-line error."""
        raw = self.string(what)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(self.path, f"{bad_utf8}, found {raw[:40]!r}") from None
        if name in seen:
            raise ModelFormatError(self.path, f"{duplicate} {name}")
        seen.add(name)
        return name

    def claim(self, count: int, min_bytes: int, what: str) -> None:
        """A count read from the file must fit in what is left of it before anything loops over it."""
        if count * min_bytes > self.size - self.off:
            raise ModelFormatError(self.path, f"header claims {count} {what}, the {self.size - self.off} bytes "
                                              f"left in the file hold at most {(self.size - self.off) // min_bytes}")

    def value(self, vtype: int, key: str) -> object:
        if vtype in _SCALAR_SIZES:
            off = self.take(_SCALAR_SIZES[vtype], f"value of {key}")
            return struct.unpack_from("<I", self.buf, off)[0] if vtype == 4 else None
        if vtype == _STRING:
            self.string(f"value of {key}")
            return None
        if vtype != _ARRAY:
            raise ModelFormatError(self.path, f"metadata {key}: expected a value type 0..12, found {vtype}")
        itype, n = self.u32(f"array type of {key}"), self.u64(f"array length of {key}")
        if itype in _SCALAR_SIZES:
            self.take(n * _SCALAR_SIZES[itype], f"array {key} of {n} items")
        elif itype == _STRING:  # vocabularies: 10^5 strings, so a tight loop
            self.claim(n, 8, f"items in array {key}")
            start, off, buf, size, unpack = self.off, self.off, self.buf, self.size, struct.Struct("<Q").unpack_from
            for _ in range(n):
                if off + 8 > size:
                    off = size + 1
                    break
                off += 8 + unpack(buf, off)[0]
            if off > size:
                raise ModelFormatError(self.path, f"truncated header: array {key} of {n} strings runs past the "
                                                  f"end of the file ({size} bytes)")
            self.off = self.string_arrays[start] = off
        elif itype == _ARRAY:
            self.claim(n, 12, f"items in array {key}")
            for _ in range(n):
                self.value(itype, key)
        else:
            raise ModelFormatError(self.path, f"metadata {key}: expected an array item type 0..12, found {itype}")
        return None


def _check_header(path: Path, size: int) -> dict[int, int]:
    """Walk the whole header before gguf.GGUFReader sees it: GGUFReader trusts counts and lengths
    (an array length past the end of the file makes it loop for ever), so every count, length,
    dimension, type, alignment and tensor extent is checked here against the file size first.
    Returns where each array of strings starts and ends (the reader then need not walk them again)."""
    import gguf
    if size < 24:
        raise ModelFormatError(path, f"truncated header: expected at least 24 bytes, found {size}")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(path, buf, size)
        n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
        c.claim(n_kv, 13, "metadata entries")
        keys, alignment = set(), GGUF_DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = c.unique_name(f"metadata key {i}", keys, f"metadata key {i}: expected UTF-8",
                                "duplicate metadata key")
            vtype = c.u32(f"type of {key}")
            v = c.value(vtype, key)
            if key == "general.alignment":
                if vtype != 4 or not v or v & (v - 1):
                    raise ModelFormatError(path, f"general.alignment: expected a power of two (uint32), found "
                                                 f"{v if vtype == 4 else f'value type {vtype}'}")
                alignment = v
        c.claim(n_tensors, 24, "tensors")
        infos, names = [], set()
        for i in range(n_tensors):
            name = c.unique_name(f"name of tensor {i}", names, f"tensor {i}: expected a UTF-8 name",
                                 "duplicate tensor name")
            n_dims = c.u32(f"dimension count of {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise ModelFormatError(path, f"tensor {name}: expected 1 to {GGML_MAX_DIMS} dimensions, found {n_dims}")
            dims = [c.u64(f"dimensions of {name}") for _ in range(n_dims)]
            ttype, offset = c.u32(f"type of {name}"), c.u64(f"data offset of {name}")
            if ttype not in gguf.GGML_QUANT_SIZES:
                raise ModelFormatError(path, f"unsupported tensor type {ttype} for {name}: expected one of "
                                             + ", ".join(q.name for q in sorted(SUPPORTED_QTYPES)))
            n_elems = 1
            for d in dims:
                n_elems *= d
            if min(dims) < 1 or n_elems >= 1 << 62:
                raise ModelFormatError(path, f"tensor {name}: expected positive dimensions of at most 2^62 "
                                             f"values, found {dims}")
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            if dims[0] % block:
                raise ModelFormatError(path, f"tensor {name}: row of {dims[0]} values is not a multiple of the "
                                             f"{gguf.GGMLQuantizationType(ttype).name} block ({block})")
            if offset % alignment:
                raise ModelFormatError(path, f"tensor {name}: expected a data offset aligned to {alignment} "
                                             f"bytes, found {offset}")
            infos.append((offset, n_elems // block * type_size, name))
        data_start = -(-c.off // alignment) * alignment
        for offset, nbytes, name in infos:
            end = data_start + offset + nbytes
            if data_start + offset >= size:
                raise ModelFormatError(path, f"tensor {name}: expected its data within the file's {size} bytes, "
                                             f"found it at byte {data_start + offset}")
            if end > size:
                raise ModelFormatError(path, f"truncated: tensor {name} ends at byte {end}, file has {size}")
        infos.sort()
        for (b0, n0, name0), (b1, _, name1) in zip(infos, infos[1:]):
            if b1 < b0 + n0:
                raise ModelFormatError(path, f"tensors {name0} and {name1} overlap: expected {name1} to start at "
                                             f"data offset {b0 + n0} or later, found {b1}")
        return c.string_arrays


def _open(path: Path):
    from .gguf_reader import LazyReader
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise ModelFormatError(path, f"cannot read file: {e.strerror}") from None
    if head[:4] != GGUF_MAGIC:
        raise ModelFormatError(path, f"not a GGUF file: expected magic b'GGUF', found {head[:4]!r}")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if version not in (2, 3):
        raise ModelFormatError(path, f"unsupported GGUF version: expected 2 or 3, found {version}")
    string_arrays = _check_header(path, size)
    try:
        reader = LazyReader(path, "r", string_arrays)
    except (ValueError, IndexError, OverflowError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFormatError(path, f"malformed or truncated GGUF header ({e})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFormatError(path, f"truncated: tensor {t.name} ends at byte {end}, file has {size}")
    return reader


def config_from_gguf(path: Path, reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelFormatError(path, "no general.architecture in metadata")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelFormatError(path, f"missing metadata {arch}.{key}")
        return v

    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    if n_embd < 1 or n_head < 1:
        raise ModelFormatError(path, f"metadata {arch}.embedding_length and {arch}.attention.head_count: "
                                     f"expected positive integers, found {n_embd} and {n_head}")
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    n_tokens = reader.array_len("tokenizer.ggml.tokens")  # the vocabulary itself is not read
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = _field(reader, f"{arch}.vocab_size") or n_tokens or (int(emb.shape[1]) if emb is not None else 0)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    extra = {k.split(".", 1)[1]: _field(reader, k) for k in reader.fields if k.startswith(arch + ".")}
    eog = [eos, eot]
    if arch.startswith("gemma"):  # a turn ends generation, as in llama.cpp
        eog.append(reader.string_index("tokenizer.ggml.tokens", "<end_of_turn>"))
    n_expert = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    n_ff_exp = int(_field(reader, f"{arch}.expert_feed_forward_length", 0) or 0)
    n_ff = _field(reader, f"{arch}.feed_forward_length") or n_ff_exp or need("feed_forward_length")
    return ModelConfig(
        arch=arch, n_layer=int(need("block_count")), n_embd=n_embd, n_ff=int(n_ff),
        n_expert=n_expert, n_expert_used=int(_field(reader, f"{arch}.expert_used_count", 0) or 0),
        n_ff_exp=n_ff_exp or (int(n_ff) if n_expert else 0),
        expert_norm=bool(_field(reader, f"{arch}.expert_weights_norm", arch not in _EXPERT_NO_NORM)),
        n_head=n_head, n_head_kv=int(n_head_kv), head_dim=head_dim, vocab_size=int(vocab),
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 4096)),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        rope_mode="neox" if arch in NEOX_ARCHS else "norm",
        bos_id=None if bos is None else int(bos),
        eos_ids=tuple(dict.fromkeys(int(x) for x in eog if x is not None)),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        name=str(_field(reader, "general.name", path.stem)),
        extra=extra,
    )


def load_gguf(path: Path) -> LoadedModel:
    path = Path(path)
    reader = _open(path)
    from .gguf_split import open_splits
    parts = open_splits(path, reader, _open)  # a split model's parts, else just this file
    try:
        cfg = config_from_gguf(path, reader)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError) as e:
        raise ModelFormatError(path, f"metadata: expected numbers for the hyper-parameters, found "
                                     f"{type(e).__name__}: {e}") from None
    rmap = ResidencyMap(cfg.n_layer)
    for part, t in ((p, t) for p, r in parts for t in r.tensors):
        try:
            qtype = QType(int(t.tensor_type))
        except ValueError:
            qtype = None
        if qtype not in SUPPORTED_QTYPES:
            tname = getattr(t.tensor_type, "name", str(int(t.tensor_type)))
            raise ModelFormatError(path, f"unsupported tensor type {tname} for {t.name}: expected one of "
                                         + ", ".join(q.name for q in sorted(SUPPORTED_QTYPES)))
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        while len(shape) > 2 and shape[0] == 1 and "_exps." not in t.name:  # (a single expert stays 3-D)
            shape = shape[1:]
        block = QTYPE_INFO[qtype].block_size
        if shape[-1] % block:
            raise ModelFormatError(path, f"tensor {t.name}: row of {shape[-1]} values is not a multiple of "
                                         f"the {qtype.name} block ({block})")
        nbytes = tensor_bytes(qtype, shape)
        if nbytes != int(t.n_bytes):
            raise ModelFormatError(path, f"tensor {t.name}: expected {nbytes} bytes for {qtype.name} {shape}, "
                                         f"found {int(t.n_bytes)}")
        if t.name in rmap:
            raise ModelFormatError(path, f"duplicate tensor name {t.name}")
        data = t.data
        if len(shape) == 3:  # experts (n_expert, rows, cols): expert e is data[e]
            data = data.reshape(shape[0], shape[1], -1)
            data = data if qtype in (QType.F32, QType.F16) else data.view(np.uint8)
        elif qtype not in (QType.F32, QType.F16):
            data = data.reshape(shape[0] if len(shape) > 1 else 1, -1).view(np.uint8)
        rmap.add(TensorEntry(t.name, layer_of(t.name, cfg.n_layer), shape, qtype, nbytes, data,
                             state=State.MAPPED, source=str(part)))
    if "rope_freqs.weight" in rmap and not cfg.rope_scaling:  # Llama 3.1+: per-dimension divisors
        cfg.rope_scaling = {"freq_factors": np.asarray(rmap["rope_freqs.weight"].data, np.float32).reshape(-1)}
    return LoadedModel(path=path, format="gguf", config=cfg, residency=rmap,
                       tokenizer_source=(str(path.parent), path.name),
                       metadata={k: _field(reader, k) for k in reader.fields
                                 if not k.startswith("tokenizer.ggml.") and not k.startswith("GGUF.")},
                       chat_template=_field(reader, "tokenizer.chat_template"),
                       handle=reader if len(parts) == 1 else [r for _, r in parts])
