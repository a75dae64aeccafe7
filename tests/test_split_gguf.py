"""Split GGUF (-00001-of-0000N.gguf, as llama.cpp's gguf-split and gguf-py write them) loaded as
one model: the same tensors and bit-identical logits as the single file."""
from __future__ import annotations

import numpy as np
import pytest

import lstream
from lstream.core.errors import ModelFormatError
from lstream.loaders.gguf_split import split_gguf
from lstream.loaders.model_file import load_model


@pytest.fixture(scope="module")
def split_parts(smollm2_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    return split_gguf(smollm2_path, d / "smollm2.gguf", max_tensors=100)


def test_split_loads_as_one_model(split_parts, smollm2_path):
    assert [p.name for p in split_parts] == [f"smollm2-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    whole, split = load_model(smollm2_path), load_model(split_parts[0])
    assert {e.name: (e.shape, e.qtype) for e in split.residency} == \
           {e.name: (e.shape, e.qtype) for e in whole.residency}
    assert {e.source for e in split.residency} == {str(p) for p in split_parts}
    assert split.config == whole.config
    ids = list(range(1000, 1032))
    with lstream.load(str(smollm2_path), n_ctx=64, load_tokenizer=False) as a, \
            lstream.load(str(split_parts[0]), n_ctx=64, load_tokenizer=False) as b:
        np.testing.assert_array_equal(a.eval(ids, logits="all"), b.eval(ids, logits="all"))


def test_split_errors(split_parts, tmp_path):
    with pytest.raises(ModelFormatError, match="expected the first part, smollm2-00001-of-00003.gguf"):
        load_model(split_parts[1])
    lonely = tmp_path / split_parts[0].name
    lonely.symlink_to(split_parts[0])
    with pytest.raises(ModelFormatError, match="part 2 of 3 of the split model is missing"):
        load_model(lonely)
