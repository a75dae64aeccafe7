"""A GGUF file's first N layers as a smaller valid file (every key copied, block_count set to N, the
tensors of later layers left out): a real model's weights and tokenizer in fewer bytes, for device
calls whose carry is limited (tools/h200_sbs.sh: SmolLM2's 8 layers stand in for its 30).

    python -m lstream.tools.truncate_gguf SmolLM2-135M-Instruct.Q4_1.gguf smollm2-8l.gguf --layers 8
"""
from __future__ import annotations

import argparse
import re

from gguf import GGUFReader, GGUFValueType, GGUFWriter

_BLK = re.compile(r"^blk\.(\d+)\.")


def truncate(src: str, out: str, n_layers: int) -> int:
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(out, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        val = f.contents()
        if name == f"{arch}.block_count":
            val = min(int(val), n_layers)
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, val, vtype, sub_type=sub)
    kept = 0
    for t in r.tensors:
        m = _BLK.match(t.name)
        if m and int(m.group(1)) >= n_layers:
            continue
        # raw quantized bytes: the shape in bytes per row, with the tensor's own type
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        kept += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kept


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args(argv)
    print(f"wrote {a.out}: {truncate(a.src, a.out, a.layers)} tensors")


if __name__ == "__main__":
    main()
