"""Long and repeated use: load/generate/close cycles through the API leave host RSS flat, and
close() drops the memory maps (the model file leaves /proc/self/maps) and the packed weights.

50 cycles of a tiny llama GGUF (every code path of a real load: GGUF parse, memory map, CPU repack,
K/V, eval, close), and LSTREAM_LEAK_CYCLES (default 6) cycles of SmolLM2-135M's real weights
(rewritten once without the 49k-token vocabulary, whose parse alone takes 4-8 s per load on a
loaded CI machine). Tolerance: RSS may grow by at most 8 MiB (tiny) / 24 MiB (SmolLM2) after the
warm-up cycles; a leaked SmolLM2 (its packed weights are ~100 MiB) would exceed that at once."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

import lstream
from lstream.tools.tiny_models import write_gguf

MiB = 1 << 20


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mapped(path: Path) -> bool:
    with open("/proc/self/maps") as fh:
        return str(path) in fh.read()


def cycles(path, n: int, warm: int, **kw) -> tuple[int, int]:
    before = None
    for i in range(n):
        m = lstream.load(str(path), load_tokenizer=False, n_threads=1, **kw)
        toks = list(m.generate_tokens([1, 2, 3], n_predict=2, stop_at_eos=False))
        assert len(toks) == 2
        m.close()
        assert not mapped(path), "close() left the model file mapped"
        del m
        gc.collect()
        if i == warm - 1:
            before = rss()
    after = rss()
    print(f"\nleak: {n} cycles of {Path(path).name}: RSS {before / MiB:.1f} MiB after {warm} warm-up cycles, "
          f"{after / MiB:.1f} MiB at the end ({(after - before) / MiB:+.1f} MiB)")
    return before, after


def test_tiny_50_cycles_rss_flat(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    before, after = cycles(path, 50, warm=5, n_ctx=16)
    assert after - before <= 8 * MiB


@pytest.fixture(scope="module")
def smollm2_weights(smollm2_path, tmp_path_factory):
    """SmolLM2-135M's tensors and hyper-parameters, without the tokenizer arrays."""
    from lstream.tools.gpu_cycles import strip_vocab
    out = tmp_path_factory.mktemp("leak") / "smollm2-weights.gguf"
    strip_vocab(smollm2_path, out)
    return out


@pytest.mark.slow
def test_smollm2_cycles_rss_flat(smollm2_weights):
    n = int(os.environ.get("LSTREAM_LEAK_CYCLES", "6"))
    before, after = cycles(smollm2_weights, n, warm=2, n_ctx=32)
    assert after - before <= 24 * MiB
