"""GGUF split files (llama.cpp's gguf-split, gguf-py's GGUFWriter with split_max_*):
<prefix>-00001-of-0000N.gguf holds the metadata and split.count/split.no/split.tensors.count,
every part holds its own tensors. Loaded as one model; `split_gguf` writes one for tests."""
from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import ModelFormatError

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
KEY_NO, KEY_COUNT, KEY_TENSORS = "split.no", "split.count", "split.tensors.count"


def _value(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def split_count(reader) -> int:
    return int(_value(reader, KEY_COUNT) or 1)


def split_paths(path: Path, count: int) -> list[Path]:
    """All parts of a split model from the path of its first part."""
    m = SPLIT_NAME.match(path.name)
    if m is None:
        raise ModelFormatError(path, f"split model ({count} parts): expected a name like "
                                     f"<prefix>-00001-of-{count:05d}.gguf")
    if int(m["no"]) != 1:
        first = path.with_name(f"{m['prefix']}-00001-of-{m['count']}.gguf")
        raise ModelFormatError(path, f"part {int(m['no'])} of a split model: expected the first part, {first.name}")
    if int(m["count"]) != count:
        raise ModelFormatError(path, f"name says {int(m['count'])} parts, split.count says {count}")
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def open_splits(path: Path, first_reader, open_fn) -> list[tuple[Path, object]]:
    """[(path, GGUFReader)] of every part, in order, checked against the first part's split keys."""
    count = split_count(first_reader)
    if count <= 1:
        return [(path, first_reader)]
    no = int(_value(first_reader, KEY_NO) or 0)
    if no != 0:
        m = SPLIT_NAME.match(path.name)
        first = f"{m['prefix']}-00001-of-{m['count']}.gguf" if m else "the part with split.no 0"
        raise ModelFormatError(path, f"part {no + 1} of a split model: expected the first part, {first}")
    parts = [(path, first_reader)]
    for i, p in enumerate(split_paths(path, count)[1:], start=1):
        if not p.exists():
            raise ModelFormatError(p, f"part {i + 1} of {count} of the split model is missing")
        r = open_fn(p)
        no, n = _value(r, KEY_NO), _value(r, KEY_COUNT)
        if no is None or int(no) != i or n is None or int(n) != count:
            raise ModelFormatError(p, f"expected split.no {i} of split.count {count}, found {no} of {n}")
        parts.append((p, r))
    want = _value(first_reader, KEY_TENSORS)
    found = sum(len(r.tensors) for _, r in parts)
    if want is not None and int(want) != found:
        raise ModelFormatError(path, f"split.tensors.count says {int(want)} tensors, the {count} parts hold {found}")
    return parts


def split_gguf(src, dest, max_tensors: int = 0, max_bytes: int = 0) -> list[Path]:
    """Rewrite GGUF `src` as parts of at most max_tensors tensors / max_bytes bytes named
    dest-0000i-of-0000N.gguf (dest: a path ending in .gguf); tensors are copied as stored."""
    import gguf
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(Path(dest), arch, split_max_tensors=max_tensors, split_max_size=max_bytes)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)  # data: (rows, row bytes) for blocks
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(Path(dest))
