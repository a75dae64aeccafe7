"""Synthetic GGUF models: real shapes and quant types, random but valid blocks.

For GPU benchmarks where real weights cannot be fetched. Each tensor's bytes are drawn with numpy
and streamed to disk one tensor at a time (the whole model is never held in memory); every block's
fp16 scales are overwritten with small finite values so activations stay in range, or, with
--scale S, every block's scale d is S: weights of typical size ~4.5 S with a bias (Q4_0: mean
-S/2), whose activations grow over the layers as real models' outliers do (S = 0.02 on the 8B
shape passes float16's 65504; llama.cpp runs such a file at every -ngl).

    python -m lstream.tools.synth_model llama3-8b Q4_0 out/llama3-8b-q4_0.gguf
    python -m lstream.tools.synth_model llama-70b Q4_K out/70b-4l.gguf --layers 4
    python -m lstream.tools.synth_model llama3-8b Q4_0 out/l8b-large.gguf --scale 0.02
    python -m lstream.tools.synth_model qwen3-30b-a3b Q4_K out/q3moe-2l.gguf --layers 2

Mixtures of experts (qwen3-30b-a3b, mixtral-8x7b): 3-D ffn_{gate,up,down}_exps tensors and a float32
router (ffn_gate_inp), as llama.cpp's converter writes them.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# one `lstream` import, by package or by path when run as a plain script
try:
    from lstream.core.qtypes import QTYPE_INFO, QType, tensor_bytes
except ImportError:  # pragma: no cover - `python tools/synth_model.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lstream.core.qtypes import QTYPE_INFO, QType, tensor_bytes


@dataclass(frozen=True)
class Preset:
    arch: str  # general.architecture
    n_layers: int
    dim: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    rope_base: float
    eps: float
    ctx: int
    qkv_bias: bool = False
    tied_output: bool = False
    head_dim_: int = 0  # when not dim / n_heads (Qwen3: 128 with 2048 / 32)
    qk_norm: bool = False  # per-head q/k RMS norms (Qwen3)
    n_expert: int = 0  # mixture of experts: experts per layer (every layer), experts per token, their FFN width
    n_expert_used: int = 0
    ffn_exp: int = 0

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.dim // self.n_heads


PRESETS: dict[str, Preset] = {
    "llama3-8b": Preset("llama", 32, 4096, 14336, 32, 8, 128256, 500000.0, 1e-5, 8192),
    "qwen2.5-14b": Preset("qwen2", 48, 5120, 13824, 40, 8, 152064, 1000000.0, 1e-6, 32768, qkv_bias=True),
    "llama-70b": Preset("llama", 80, 8192, 28672, 64, 8, 128256, 500000.0, 1e-5, 8192),
    # mixtures of experts: Qwen3-30B-A3B (128 experts of 768, top-8; q/k norms) and Mixtral 8x7B (8 of
    # 14336, top-2: llama.cpp's "llama" with experts)
    "qwen3-30b-a3b": Preset("qwen3moe", 48, 2048, 6144, 32, 4, 151936, 1000000.0, 1e-6, 40960, head_dim_=128,
                            qk_norm=True, n_expert=128, n_expert_used=8, ffn_exp=768),
    "mixtral-8x7b": Preset("llama", 32, 4096, 14336, 32, 8, 32000, 1000000.0, 1e-5, 32768, n_expert=8,
                           n_expert_used=2, ffn_exp=14336),
    "tiny-moe": Preset("qwen3moe", 2, 256, 512, 4, 2, 512, 10000.0, 1e-6, 512, head_dim_=64, qk_norm=True,
                       n_expert=8, n_expert_used=2, ffn_exp=256),
    # the 8B layers with a 4096-token vocabulary: a small file for tests of the layers' numerics
    "llama3-8b-v4k": Preset("llama", 32, 4096, 14336, 32, 8, 4096, 500000.0, 1e-5, 8192),
    # small shapes for tests (not real models)
    "tiny": Preset("llama", 2, 256, 512, 4, 2, 512, 10000.0, 1e-5, 512),
    "tiny-qwen": Preset("qwen2", 2, 256, 512, 4, 2, 512, 10000.0, 1e-6, 512, qkv_bias=True),
}

# llama.cpp's ftype ids (general.file_type) for the files we write
FILE_TYPE = {QType.F16: 1, QType.Q4_0: 2, QType.Q4_1: 3, QType.Q8_0: 7, QType.Q5_0: 8, QType.Q5_1: 9,
             QType.Q4_K: 15, QType.Q5_K: 17, QType.Q6_K: 18, QType.BF16: 32}

# fp16 scale fields per block: (byte offset, magnitude). Magnitudes make a weight's typical size
# ~0.01, so a 4096-wide dot product of unit activations stays O(1) through many layers.
_SCALES: dict[QType, list[tuple[int, float]]] = {
    QType.Q4_0: [(0, 2e-3)],
    QType.Q4_1: [(0, 2e-3), (2, 1e-2)],  # d, m
    QType.Q5_0: [(0, 1e-3)],
    QType.Q5_1: [(0, 1e-3), (2, 1e-2)],
    QType.Q8_0: [(0, 1.5e-4)],
    QType.Q4_K: [(0, 7e-5), (2, 3e-5)],  # d, dmin (super-block)
    QType.Q5_K: [(0, 3.5e-5), (2, 3e-5)],
    QType.Q6_K: [(208, 8e-6)],  # d is the last field
}

# Mixtures of experts: with random q/k, attention averages over every earlier position, so its output
# is nearly one vector for all tokens; summed into the residual over the layers it becomes the
# direction every router sees, and from the fourth layer on every token of a prompt routed to the
# same 8 of 128 experts (measured on the Qwen3-30B-A3B shape). Trained routers spread a ubatch over
# all experts, and what a prompt uploads and a host computes depends on that: so the token's own
# embedding is drawn larger and attention's output smaller, which keeps every layer's routing spread
# (a 512-token prompt: all 128 experts in each of 8 layers, the top 16 taking ~16% of the pairs).
ROUTED_GAIN = {"token_embd": 30.0, "attn_output": 0.1}


def tensor_plan(p: Preset, wtype: QType, embd_type: QType, out_type: QType) -> list[tuple[str, tuple[int, ...], QType]]:
    """(name, numpy-order shape (rows, cols), or (n_expert, rows, cols) for experts, type) for every
    tensor, in file order."""
    kv, q = p.n_kv_heads * p.head_dim, p.n_heads * p.head_dim
    plan: list[tuple[str, tuple[int, ...], QType]] = [("token_embd.weight", (p.vocab, p.dim), embd_type)]
    for i in range(p.n_layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (p.dim,), QType.F32),
                 (b + "attn_q.weight", (q, p.dim), wtype),
                 (b + "attn_k.weight", (kv, p.dim), wtype),
                 (b + "attn_v.weight", (kv, p.dim), wtype)]
        if p.qkv_bias:
            plan += [(b + "attn_q.bias", (q,), QType.F32), (b + "attn_k.bias", (kv,), QType.F32),
                     (b + "attn_v.bias", (kv,), QType.F32)]
        if p.qk_norm:
            plan += [(b + "attn_q_norm.weight", (p.head_dim,), QType.F32),
                     (b + "attn_k_norm.weight", (p.head_dim,), QType.F32)]
        plan += [(b + "attn_output.weight", (p.dim, q), wtype),
                 (b + "ffn_norm.weight", (p.dim,), QType.F32)]
        if p.n_expert:
            x, f = p.n_expert, p.ffn_exp
            plan += [(b + "ffn_gate_inp.weight", (x, p.dim), QType.F32),
                     (b + "ffn_gate_exps.weight", (x, f, p.dim), wtype),
                     (b + "ffn_up_exps.weight", (x, f, p.dim), wtype),
                     (b + "ffn_down_exps.weight", (x, p.dim, f), wtype)]
        else:
            plan += [(b + "ffn_gate.weight", (p.ffn, p.dim), wtype),
                     (b + "ffn_up.weight", (p.ffn, p.dim), wtype),
                     (b + "ffn_down.weight", (p.dim, p.ffn), wtype)]
    plan.append(("output_norm.weight", (p.dim,), QType.F32))
    if not p.tied_output:
        plan.append(("output.weight", (p.vocab, p.dim), out_type))
    return plan


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], qt: QType,
                  scale: float | None = None, gain: float = 1.0) -> np.ndarray:
    """Random valid data: float arrays for F32/F16/BF16, (rows, row_bytes) uint8 blocks otherwise;
    scale: every block's first scale field (d) set to it (the others keep their small sizes), else
    weights of mean zero and typical size `gain` x _SCALES'."""
    if qt == QType.F32:
        if name.endswith("norm.weight"):
            return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if qt == QType.F16:
        return (0.01 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    if qt == QType.BF16:
        f = (0.01 * rng.standard_normal(shape, dtype=np.float32)).view(np.uint32)
        return ((f + 0x8000) >> 16).astype(np.uint16)  # round to nearest; stored as raw uint16
    info = QTYPE_INFO[qt]
    nbytes = tensor_bytes(qt, shape)
    data = rng.bit_generator.random_raw((nbytes + 7) // 8).view(np.uint8)[:nbytes]  # (7x integers' speed)
    if scale is None and qt in _BYTE_CENTER:  # (the scale bytes are written after)
        data[:] = _BYTE_CENTER[qt][data]
    blocks = data.reshape(-1, info.type_size)
    for k, (off, mag) in enumerate(_SCALES[qt]):
        if k == 0 and scale is not None:
            s = np.full(blocks.shape[0], scale, np.float16)
        else:  # |scale| in [0.5, 1.5] * mag
            mag = mag * (gain if k == 0 else 1.0)
            s = (mag * (0.5 + rng.random(blocks.shape[0], dtype=np.float32))).astype(np.float16)
        blocks[:, off:off + 2] = s.view(np.uint8).reshape(-1, 2)
    if scale is None:
        _center(blocks, qt)
    return data.reshape(*shape[:-1], -1) if len(shape) > 1 else data.reshape(1, -1)


def _byte_luts() -> dict[QType, np.ndarray]:
    b = np.arange(256)
    lo, hi = b & 15, b >> 4
    # Q4_0: nibble 0 (-8d) becomes 8 (0): the values -7..7 and 0 twice, mean 0; Q8_0: -128 becomes 0
    return {QType.Q4_0: (np.where(lo == 0, 8, lo) | (np.where(hi == 0, 8, hi) << 4)).astype(np.uint8),
            QType.Q8_0: np.where(b == 0x80, 0, b).astype(np.uint8)}


_BYTE_CENTER = _byte_luts()


def _center(blocks: np.ndarray, qt: QType) -> None:
    """Make the random blocks' weights average zero, as trained weights do. Uniform quants average
    -d/2 (Q4_0) or +7.5d + m (Q4_1); that shared offset gives every layer's output one common
    direction, which grows over the layers until every token routes to the same experts (8 of 128
    in each layer of the Qwen3-30B-A3B shape), where a real router spreads a ubatch over all."""
    if qt == QType.Q5_0:  # value 0 (-16d: low nibble 0, high bit 0) becomes 16 (0)
        qh = blocks[:, 2:6].copy().view(np.uint32)[:, 0]
        qs = blocks[:, 6:22]
        bits = np.arange(16, dtype=np.uint32)
        for nib, shift in ((qs & 15, 0), (qs >> 4, 16)):
            fix = (nib == 0) & (((qh[:, None] >> (bits + shift)) & 1) == 0)
            qh |= (fix.astype(np.uint32) << (bits + shift)).sum(axis=1, dtype=np.uint32)
        blocks[:, 2:6] = qh.view(np.uint8).reshape(-1, 4)
    elif qt in (QType.Q4_1, QType.Q5_1):  # m = -(levels - 1) / 2 * d: the block's values centred
        d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
        half = 7.5 if qt == QType.Q4_1 else 15.5
        blocks[:, 2:4] = (-half * d).astype(np.float16).view(np.uint8).reshape(-1, 2)
    elif qt in (QType.Q4_K, QType.Q5_K):  # each sub-block's min m_j = its scale sc_j, dmin = 7.5 d
        sc = blocks[:, 4:16]  # (12 bytes of 6-bit sc/m: equal when bytes 4-7 = 0-3, 8-11's nibbles equal)
        sc[:, 4:8] = sc[:, 0:4]
        sc[:, 8:12] = (sc[:, 8:12] & 15) * 17
        d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
        half = 7.5 if qt == QType.Q4_K else 15.5
        blocks[:, 2:4] = (half * d).astype(np.float16).view(np.uint8).reshape(-1, 2)


def write_model(path: str | Path, preset: str | Preset, wtype: QType | str = QType.Q4_0, *,
                layers: int | None = None, embd_type: QType | str | None = None,
                out_type: QType | str | None = None, seed: int = 0, verbose: bool = False,
                scale: float | None = None) -> Path:
    import gguf

    p = PRESETS[preset] if isinstance(preset, str) else preset
    if layers is not None:
        p = replace(p, n_layers=layers)
    wtype = QType[wtype] if isinstance(wtype, str) else QType(wtype)
    embd_type = wtype if embd_type is None else (QType[embd_type] if isinstance(embd_type, str) else embd_type)
    out_type = wtype if out_type is None else (QType[out_type] if isinstance(out_type, str) else out_type)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(p, wtype, embd_type, out_type)

    w = gguf.GGUFWriter(str(path), p.arch)
    name = preset if isinstance(preset, str) else "custom"
    w.add_name(f"lstream-synthetic-{name}-{wtype.name}")
    w.add_file_type(FILE_TYPE.get(wtype, 0))
    w.add_quantization_version(2)
    w.add_context_length(p.ctx)
    w.add_embedding_length(p.dim)
    w.add_block_count(p.n_layers)
    w.add_feed_forward_length(p.ffn)
    w.add_head_count(p.n_heads)
    w.add_head_count_kv(p.n_kv_heads)
    w.add_rope_freq_base(p.rope_base)
    w.add_rope_dimension_count(p.head_dim)
    w.add_layer_norm_rms_eps(p.eps)
    w.add_vocab_size(p.vocab)
    if p.head_dim_:
        w.add_key_length(p.head_dim)
        w.add_value_length(p.head_dim)
    if p.n_expert:
        w.add_expert_count(p.n_expert)
        w.add_expert_used_count(p.n_expert_used)
        if p.arch != "llama":  # Mixtral's experts are feed_forward_length wide
            w.add_expert_feed_forward_length(p.ffn_exp)
    _add_tokenizer(w, p.vocab)

    for tname, shape, qt in plan:
        if qt in (QType.F32, QType.F16, QType.BF16):
            dt = {QType.F32: np.float32, QType.F16: np.float16, QType.BF16: np.uint16}[qt]
            nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
            w.add_tensor_info(tname, shape, np.dtype(dt), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType.BF16 if qt == QType.BF16 else None)
        else:
            nb = tensor_bytes(qt, shape)
            rows = int(np.prod(shape[:-1]))
            w.add_tensor_info(tname, (*shape[:-1], nb // rows), np.dtype(np.uint8), nb,
                              raw_dtype=gguf.GGMLQuantizationType(int(qt)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    t0, total = time.time(), 0
    for tname, shape, qt in plan:
        gain = ROUTED_GAIN.get(tname.split(".")[-2], 1.0) if p.n_expert and scale is None else 1.0
        arr = random_tensor(rng, tname, shape, qt, scale, gain)
        w.write_tensor_data(arr)
        total += arr.nbytes
        if verbose and arr.nbytes > (64 << 20):
            print(f"  {tname:28s} {qt.name:5s} {arr.nbytes / 2**20:8.1f} MiB", file=sys.stderr)
    w.close()
    if verbose:
        dt = time.time() - t0
        print(f"wrote {path}: {total / 2**30:.2f} GiB of tensors in {dt:.1f} s", file=sys.stderr)
    return path


def _add_tokenizer(w, vocab: int) -> None:
    """Minimal gpt2-style BPE vocabulary of exactly `vocab` tokens: the 256 byte tokens, then fillers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_tokens = [chr(c) for c in cs]
    n_special = 2
    # two merges ("!" + "!" -> "!!", "!!" + "!" -> "!!!"): llama.cpp refuses a BPE vocabulary without
    # merges, and transformers' GGUF reader (5.17) unwraps a one-element array into a bare string
    toks = byte_tokens + ["!!", "!!!"] + [f"<|synth_{i}|>" for i in range(vocab - 258 - n_special)]
    toks += ["<|begin_of_text|>", "<|end_of_text|>"]
    toks = toks[:vocab]
    types = [1] * len(toks)
    if vocab >= 258:
        types[-2:] = [3, 3]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(["! !", "!! !"])
    w.add_bos_token_id(max(vocab - 2, 0))
    w.add_eos_token_id(max(vocab - 1, 0))


def truncate_gguf(src: str | Path, dst: str | Path, n_layers: int) -> Path:
    """Copy a real GGUF keeping only its first n_layers blocks (metadata and other tensors kept).

    For GPU tests of real weights where the whole file cannot travel (e.g. SmolLM2-135M: 98 MB)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val = f.contents()
        if name == f"{arch}.block_count":
            val = n_layers
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(name, val, vtype, sub_type=sub)
    keep = []
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layers:
            continue
        keep.append(t)
        shape = tuple(int(x) for x in t.shape[::-1])
        raw = t.data
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor_info(t.name, shape, raw.dtype, int(t.n_bytes))
        else:
            w.add_tensor_info(t.name, raw.shape, np.dtype(np.uint8), int(t.n_bytes), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in keep:
        w.write_tensor_data(np.asarray(t.data))
    w.close()
    return Path(dst)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("qtype", choices=["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None, help="cut the layer count (e.g. a 70B shape with 4 layers)")
    ap.add_argument("--embd-type", default=None, help="token_embd type (default: same as the weights)")
    ap.add_argument("--output-type", default=None, help="output.weight type (default: same; llama.cpp uses Q6_K)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=None,
                    help="every block's scale d (0.02: activations past float16's range on the 8B shape)")
    a = ap.parse_args(argv)
    write_model(a.out, a.preset, a.qtype, layers=a.layers, embd_type=a.embd_type, out_type=a.output_type,
                seed=a.seed, verbose=True, scale=a.scale)


if __name__ == "__main__":
    main()
