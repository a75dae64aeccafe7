"""The context (-c): a prompt longer than it fails clearly and leaves the model usable; generation
stops at its end (no error, no overrun)."""
from __future__ import annotations

import pytest

from lstream.api import Model
from lstream.core.errors import LStreamError
from lstream.core.kv_cache import ContextFullError
from lstream.loaders.model_file import load_model
from lstream.tools.tiny_models import write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("ctx") / "tiny.gguf")
    m = Model(load_model(path), n_ctx=8, load_tokenizer=False)
    yield m
    m.close()


def test_prompt_longer_than_context(tiny):
    tiny.reset()
    with pytest.raises(ContextFullError, match=r"context full: 0 tokens cached \+ 9 new > context size 8 \(raise -c\)"):
        tiny.eval(list(range(9)))
    assert isinstance(ContextFullError("x"), LStreamError) and isinstance(ContextFullError("x"), ValueError)
    assert tiny.n_past == 0  # nothing half-written: the model is still usable
    assert tiny.eval([1, 2]).shape == (16,)


def test_generation_stops_at_context_end(tiny):
    tiny.reset()
    toks = list(tiny.generate_tokens([1, 2, 3], n_predict=100, stop_at_eos=False))
    # 8 - 3 positions left: each generated token but the last is evaluated into the cache
    assert len(toks) == 8 - 3 + 1
    assert tiny.n_past == 8
    with pytest.raises(ContextFullError):
        tiny.eval([1])
    tiny.reset()
    assert list(tiny.generate_tokens([1, 2, 3], n_predict=2, stop_at_eos=False)) == toks[:2]


def test_prompt_that_fills_context_exactly(tiny):
    tiny.reset()
    toks = list(tiny.generate_tokens(list(range(8)), n_predict=5, stop_at_eos=False))
    assert len(toks) == 1 and tiny.n_past == 8
