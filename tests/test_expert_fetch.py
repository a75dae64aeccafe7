"""The share's expert fetch kernel (backends/cuda/expert_fetch.py): routed experts' gate, up and down
rows gathered from the expert arena into the share slot, byte for byte (in Triton's interpreter on CPU
tensors; on the GPU from a pinned arena past 8 GiB, where word offsets need 64 bits)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from lstream.backends.cuda import expert_fetch as ef  # noqa: E402

pytestmark = pytest.mark.skipif(not ef.HAVE_TRITON, reason="needs triton")


def _expected(arena: np.ndarray, ids, first, n, n_max, base, pitch, eb, slot0: np.ndarray) -> np.ndarray:
    want = slot0.copy()
    for i in range(n):
        e = int(ids[first + i])
        for r in range(3):
            o = base + r * pitch + e * eb
            want[r, i] = arena[o:o + eb]
    return want


@pytest.fixture
def interp(monkeypatch):
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if isinstance(ef._k_fetch, triton.runtime.JITFunction):
        monkeypatch.setattr(ef, "_k_fetch", InterpretedFunction(ef._k_fetch.fn))


@pytest.mark.parametrize("eb", [16 * 1100, 4 * ef.CHUNK * 2], ids=["partial-chunk", "whole-chunks"])
def test_fetch_gathers_the_routed_experts(interp, eb):
    """3 of a token's 8 experts (the last ones) into a 4-expert slot; the slot's unused row untouched."""
    rng = np.random.default_rng(0)
    n_expert, base = 10, 48
    pitch = n_expert * eb + 32  # (tensors one tensor and a gap apart, as in a layer of the arena)
    arena = rng.integers(0, 256, base + 3 * pitch, dtype=np.uint8)
    ids = torch.tensor([[9, 0, 4, 7, 1, 8, 3, 5]], dtype=torch.int64)
    slot = torch.full((3, 4, eb), 0xAB, dtype=torch.uint8)
    want = _expected(arena, ids[0].numpy(), 5, 3, 4, base, pitch, eb, slot.numpy())
    ef.fetch(torch.from_numpy(arena), ids, 5, 3, slot, base, pitch, eb)
    assert np.array_equal(slot.numpy(), want)


def test_usable_needs_a_device_slot_and_16_byte_offsets():
    arena = torch.zeros(1024, dtype=torch.uint8)
    assert not ef.usable(arena, torch.zeros((3, 2, 64), dtype=torch.uint8), 0, 256, 64)  # CPU slot
    if torch.cuda.is_available():
        pinned, slot = arena.pin_memory(), torch.zeros((3, 2, 64), dtype=torch.uint8, device="cuda")
        assert ef.usable(pinned, slot, 0, 256, 64)
        assert not ef.usable(pinned, slot, 8, 256, 64) and not ef.usable(pinned, slot, 0, 256, 72)
        assert not ef.usable(arena, slot, 0, 256, 64)  # pageable memory: not mapped into the device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fetch_from_a_pinned_arena_past_8_gib():
    """Qwen3-30B-A3B's expert size (768 x 2048 Q4_0: 884736 bytes) at offsets past 2^31 words."""
    eb, n_expert = 884736, 128
    pitch = n_expert * eb
    base = (9 << 30) - 3 * pitch  # the last layer's gate tensor of a 9 GiB arena
    arena = torch.empty(9 << 30, dtype=torch.uint8, pin_memory=True)
    rng = np.random.default_rng(1)
    ids = torch.tensor([[3, 127, 64, 0, 90, 1, 126, 17]], dtype=torch.int64)
    for e in ids[0, 4:].tolist():  # only the fetched experts' bytes need values
        for r in range(3):
            o = base + r * pitch + e * eb
            arena[o:o + eb] = torch.from_numpy(rng.integers(0, 256, eb, dtype=np.uint8))
    slot = torch.full((3, 4, eb), 7, dtype=torch.uint8, device="cuda")
    assert ef.usable(arena, slot, base, pitch, eb)
    ef.fetch(arena, ids.cuda(), 4, 4, slot, base, pitch, eb)
    got = slot.cpu().numpy()
    for i, e in enumerate(ids[0, 4:].tolist()):
        for r in range(3):
            o = base + r * pitch + e * eb
            assert np.array_equal(got[r, i], arena[o:o + eb].numpy()), (i, r)
