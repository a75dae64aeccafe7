"""gguf.GGUFReader, less its slow path.

GGUFReader slices the memory map once per metadata array item and once per string: the vocabulary,
its merges, scores and token types are half a million numpy views (9 s for SmolLM2's 49k tokens,
44 s for Gemma 3's 262k), read on every load though a load needs none of them. LazyReader leaves
metadata arrays of DEFER_MIN items or more as their type and length until their field is asked
for (reader.fields[key], .get, .items, .values); then GGUFReader's own code reads it, so every
field is exactly what GGUFReader gives. Tensor infos and tensors are GGUFReader's. Byte-swapped
files take GGUFReader's path whole.

Callers check the header first (loaders/gguf.py's _check_header): like GGUFReader, this trusts the
counts and lengths it reads, and it takes the extents of the string arrays from that walk."""
from __future__ import annotations

import struct
import sys
import weakref
from collections.abc import MutableMapping

import gguf
import numpy as np
from gguf import GGUFValueType


class _Fields(MutableMapping):
    """GGUFReader.fields whose long arrays are read when first asked for (every way in: [], get,
    items, values goes through __getitem__); iterating the keys reads nothing. It holds its reader
    weakly: no reference cycle, so dropping the reader unmaps the file at once (not at the next gc)."""

    def __init__(self, reader):
        self.reader, self.raw = weakref.proxy(reader), {}

    def __getitem__(self, key):
        f = self.raw[key]
        if key in self.reader.deferred:
            f = self.raw[key] = self.reader.complete(f)
            self.reader.deferred.discard(key)
        return f

    def __setitem__(self, key, value):
        self.raw[key] = value

    def __delitem__(self, key):
        del self.raw[key]
        self.reader.deferred.discard(key)

    def __iter__(self):
        return iter(self.raw)

    def __len__(self):
        return len(self.raw)

    def __contains__(self, key):
        return key in self.raw


class LazyReader(gguf.GGUFReader):
    """gguf.GGUFReader that reads metadata arrays of DEFER_MIN items or more when asked for;
    string_arrays: {offset of an array's first string: offset past its last} from a header walk."""
    DEFER_MIN = 1024

    def __init__(self, path, mode="r", string_arrays: dict[int, int] | None = None):
        self.deferred: set[str] = set()
        self._string_arrays = string_arrays or {}
        self._nested = self._deferring = False
        super().__init__(path, mode)

    @property
    def fields(self):
        return self._fields

    @fields.setter
    def fields(self, value):  # GGUFReader.__init__ assigns an empty OrderedDict, then pushes into it
        self._fields = _Fields(self)
        self._fields.raw.update(value)

    def _get_field_parts(self, orig_offs, raw_type):
        if self._nested or raw_type != GGUFValueType.ARRAY or self.byte_order != "I" \
                or sys.byteorder != "little":
            return self._full_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n = int(raw_itype[0]), int(alen[0])
        scalar = self.gguf_scalar_to_np.get(itype)  # GGUFValueType is an IntEnum: ints are keys
        if n < self.DEFER_MIN or scalar is None and itype != GGUFValueType.STRING:
            return self._full_parts(orig_offs, raw_type)
        start = orig_offs + 12
        end = start + n * np.dtype(scalar).itemsize if scalar is not None else self._strings_end(start, n)
        self._deferring = True
        return end - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, GGUFValueType(itype)]

    def _full_parts(self, orig_offs, raw_type):
        nested, self._nested = self._nested, True  # items of an array are read in full
        try:
            return super()._get_field_parts(orig_offs, raw_type)
        finally:
            self._nested = nested

    def _push_field(self, field, skip_sum=False):
        if self._deferring:  # _build_fields pushes the field whose value was just deferred
            self._deferring = False
            self.deferred.add(field.name)
        return super()._push_field(field, skip_sum)

    def _strings_end(self, off: int, n: int) -> int:
        end = self._string_arrays.get(off)
        if end is not None:
            return end
        buf, unpack = self.data, struct.Struct("<Q").unpack_from
        for _ in range(n):
            off += 8 + unpack(buf, off)[0]
        return off

    def complete(self, f):
        """A deferred field read in full, as GGUFReader._build_fields reads it."""
        head = f.parts[:3]  # key length, key, value type
        value_offs = f.offset + sum(int(p.nbytes) for p in head)
        _, parts, idxs, types = self._full_parts(value_offs, GGUFValueType.ARRAY)
        return type(f)(f.offset, f.name, head + parts, [i + len(head) for i in idxs], types)

    def array_len(self, key: str) -> int | None:
        """Items in the metadata array `key` (None: no such key, or not an array), without reading them."""
        f = self._fields.raw.get(key)
        if f is None or not f.types or f.types[0] != GGUFValueType.ARRAY:
            return None
        return int(f.parts[4][0])

    def string_index(self, key: str, text: str) -> int | None:
        """Index of `text` in the metadata array of strings `key` (None: absent), reading only
        the strings before it."""
        f = self._fields.raw.get(key)
        if f is None or f.types[:2] != [GGUFValueType.ARRAY, GGUFValueType.STRING]:
            return None
        if key not in self.deferred:
            items = f.contents()
            return items.index(text) if text in items else None
        want, buf, unpack = text.encode("utf-8"), memoryview(self.data), struct.Struct("<Q").unpack_from
        off = f.offset + sum(int(p.nbytes) for p in f.parts)
        for i in range(int(f.parts[4][0])):
            n = unpack(buf, off)[0]
            if n == len(want) and buf[off + 8:off + 8 + n] == want:
                return i
            off += 8 + n
        return None
