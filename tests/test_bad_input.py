"""Every bad-model-file case of tools/errors_table.py: a ModelFormatError in the API naming the file,
what was expected and what was found; `error: <one line>` and exit 1 in the CLI."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from lstream.core.errors import ModelFormatError
from lstream.loaders.model_file import load_model
from lstream.tools.errors_table import CASES, write_gguf, write_st_dir


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_file_api(case, tmp_path):
    path = case.build(tmp_path)
    with pytest.raises(ModelFormatError) as ei:
        load_model(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(str(tmp_path)), msg  # names the file
    for needle in case.needles:
        assert needle in msg, (needle, msg)


CLI_CASES = [c for c in CASES if c.id in ("gguf-string-length", "gguf-overlap", "gguf-config-layer",
                                           "st-overlap", "st-dup", "st-truncated")]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_file_cli(case, tmp_path):
    from lstream.cli.main import cli
    path = case.build(tmp_path)
    r = CliRunner().invoke(cli, ["run", "-m", str(path), "-p", "hi", "-n", "1"])
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], r.stderr
    assert all(n in lines[0] for n in case.needles), lines[0]


def test_valid_tiny_files_load(tmp_path):
    """The bases the cases and the fuzzer change are themselves valid, and run."""
    from lstream.api import Model
    for path in (write_gguf(tmp_path / "tiny.gguf"), write_st_dir(tmp_path / "tiny_st")):
        loaded = load_model(path)
        assert loaded.config.n_layer == 2
        with Model(loaded, n_ctx=8, load_tokenizer=False) as m:
            assert m.eval([1, 2]).shape == (16,)
