"""Experts of a Hugging Face checkpoint gathered into the canonical 3-D tensors (GGUF's
blk.N.ffn_{gate,up,down}_exps.weight): one residency entry per tensor, whose data is the sequence of
the experts' own matrices where they lie in the files (zero-copy; entry.expert(e) is expert e)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import ModelFormatError
from ..core.residency import ResidencyMap, State, TensorEntry
from .names import expert_from_hf, fused_experts_from_hf, layer_of


class ExpertGather:
    def __init__(self):
        self.parts: dict[str, dict[int, tuple]] = {}  # canonical -> expert -> (matrix, qtype, file)

    @staticmethod
    def matches(hf_name: str) -> bool:
        return expert_from_hf(hf_name) is not None or fused_experts_from_hf(hf_name) is not None

    def add(self, hf_name: str, raw: np.ndarray, shape: tuple, qtype, np_dtype, file: Path) -> None:
        """raw: the tensor's bytes in the memory map (shape as the header says, dtype np_dtype)."""
        arr = raw.view(np_dtype).reshape(shape) if np_dtype is not np.uint8 else raw.reshape(*shape[:-1], -1)
        one = expert_from_hf(hf_name)
        if one is not None:
            canon, e = one
            self._put(file, canon, e, arr, qtype)
            return
        il, kind = fused_experts_from_hf(hf_name)
        if len(shape) != 3:
            raise ModelFormatError(file, f"tensor {hf_name}: expected (n_expert, rows, cols), found {tuple(shape)}")
        if kind == "down_proj":
            for e in range(shape[0]):
                self._put(file, f"blk.{il}.ffn_down_exps.weight", e, arr[e], qtype)
            return
        ff = shape[1] // 2
        for e in range(shape[0]):
            self._put(file, f"blk.{il}.ffn_gate_exps.weight", e, arr[e, :ff], qtype)
            self._put(file, f"blk.{il}.ffn_up_exps.weight", e, arr[e, ff:], qtype)

    def _put(self, file, canon, e, arr, qtype) -> None:
        got = self.parts.setdefault(canon, {})
        if e in got:
            raise ModelFormatError(file, f"expert {e} of {canon} given twice")
        got[e] = (arr, qtype, file)

    def finish(self, rmap: ResidencyMap, path: Path) -> None:
        """One entry per 3-D tensor; every expert 0..n-1 present, all of one type and shape."""
        for canon, got in sorted(self.parts.items()):
            n = max(got) + 1
            missing = [e for e in range(n) if e not in got]
            if missing:
                raise ModelFormatError(path, f"tensor {canon}: expert {missing[0]} of {n} missing")
            mats = [got[e][0] for e in range(n)]
            qtypes = {got[e][1] for e in range(n)}
            # (rows, cols) in values: BF16 matrices are kept as their bytes (uint8, 2 per value)
            shapes = {(m.shape[0], m.shape[1] // 2 if m.dtype == np.uint8 else m.shape[1]) for m in mats}
            if len(qtypes) > 1 or len(shapes) > 1:
                raise ModelFormatError(path, f"tensor {canon}: expected experts of one type and shape, found "
                                             f"{sorted(q.name for q in qtypes)} {sorted(shapes)}")
            rows, cols = shapes.pop()
            qtype = qtypes.pop()
            nbytes = sum(int(m.nbytes) for m in mats)
            if canon in rmap:
                raise ModelFormatError(path, f"duplicate tensor {canon}")
            rmap.add(TensorEntry(canon, layer_of(canon, rmap.n_layer), (n, rows, cols), qtype, nbytes, tuple(mats),
                                 state=State.MAPPED, source=str(got[0][2])))
