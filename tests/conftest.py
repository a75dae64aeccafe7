"""Shared fixtures: the real default model (pulled once), and skipping of GPU tests without a GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from lstream.loaders.registry import pull
    return pull("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import lstream
    model = lstream.load(str(smollm2_path), n_ctx=2048)
    yield model
    model.close()


@pytest.fixture(scope="session")
def text_tokens(smollm2) -> list[int]:
    return smollm2.tokenize((DATA / "declaration.txt").read_text(), bos=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own model from the same GGUF, dequantized to float32: the oracle."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                             dtype=torch.float32)
    m.eval()
    return m
