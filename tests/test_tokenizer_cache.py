"""The tokenizer converted from a GGUF file and cached (loaders/tokenizer_cache.py): the same token
ids, texts and chat template output as transformers' tokenizer built from the file (the uncached
path), for both real models, on the first load (converted) and the next (from the cache); a
corrupt or stale cache is rebuilt; an unwritable cache still loads; nothing in the process
environment changes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lstream.loaders import tokenizer as tok_mod  # noqa: E402
from lstream.loaders import tokenizer_cache  # noqa: E402
from lstream.loaders.model_file import load_model  # noqa: E402
from lstream.loaders.tokenizer import Tokenizer  # noqa: E402

DATA = Path(__file__).parent / "data"
TEXTS = [
    "Hello", "", " ", "  leading and trailing  ", "The capital of France is", "naïve café — déjà vu, Straße",
    "日本語のテキストと中文", "emoji 🙂👍🏽 and a ZWJ 👩‍💻", "tabs\tand\nnew\r\nlines\n\n\n", "\u00a0nbsp\u200bzero width",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<start_of_turn>model\nok<end_of_turn>",
    "<bos><eos><pad><unk><|endoftext|>", "not <|im_end special", "numbers 1234567890 3.14159 1e-5",
    "def f(x):\n    return x ** 2  # code", "Ünïcödé ÀÉÎÕÜ ĳ ﬁ Ω ∑ √", "a" * 200, "\ufffd\u0000\u0001",
]
CHATS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}],
    [{"role": "user", "content": "naïve?"}, {"role": "assistant", "content": "Yes, naïve."},
     {"role": "user", "content": "  and  <|im_end|> <end_of_turn> \n"}],
]
MODELS = ["smollm2-135m", "gemma3-270m"]


def _pull(name):
    from lstream.loaders.registry import PullError, pull
    try:
        return pull(name, quiet=True)
    except PullError as e:
        pytest.skip(f"{name} not available: {e}")


@pytest.fixture(scope="module", params=MODELS)
def converted(request, tmp_path_factory):
    """(first, second, hf, template, path): the Tokenizer that converted the file (and cached it),
    the one that read the cache, and transformers' tokenizer of that same conversion."""
    path = _pull(request.param)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTREAM_CACHE", str(tmp_path_factory.mktemp("cache")))
        built = []
        real = tok_mod.from_transformers

        def spy(directory, gguf_file):
            built.append(real(directory, gguf_file))
            return built[-1]
        mp.setattr(tok_mod, "from_transformers", spy)
        m = load_model(path)
        cfg = m.config
        args = (m.tokenizer_source, m.chat_template, cfg.bos_id, cfg.eos_ids, cfg.add_bos)
        first = Tokenizer(*args)
        second = Tokenizer(*args)
        assert len(built) == 1, "the second load converted again"
        assert first.origin == "converted from the GGUF file, cached" and second.origin == "cache"
        assert isinstance(first.backend, tok_mod.FastBackend) and isinstance(second.backend, tok_mod.FastBackend)
        yield first, second, built[0], m.chat_template, path


def test_same_ids_and_texts_as_transformers(converted):
    first, second, hf, _, _ = converted
    texts = TEXTS + [(DATA / "declaration.txt").read_text()[:3000]] + list(hf.special_tokens_map.values())
    for text in texts:
        want = hf.encode(text, add_special_tokens=False)
        assert first.encode(text, bos=False) == want, text
        assert second.encode(text, bos=False) == want, text
        assert second.decode(want) == hf.decode(want, skip_special_tokens=False), text
    n = len(hf)
    ids = list(range(0, 400)) + list(range(n - 300, n)) + [(i * 7919) % n for i in range(2000)]
    for chunk in (ids[i:i + 50] for i in range(0, len(ids), 50)):
        assert second.decode(chunk) == hf.decode(chunk, skip_special_tokens=False)
    for i in ids[:600]:
        assert second.decode([i]) == hf.decode([i], skip_special_tokens=False), i
    assert first.vocab_size == second.vocab_size == len(hf)
    assert first.eos_ids == second.eos_ids and hf.eos_token_id in second.eos_ids
    assert second.encode("Hello", bos=True)[0] == second.bos_id


def test_same_chat_template_output_as_transformers(converted):
    first, second, hf, template, _ = converted
    assert template and second.chat_template == template
    for chat in CHATS:
        for agp in (True, False):
            want = hf.apply_chat_template(chat, chat_template=template, add_generation_prompt=agp, tokenize=False)
            assert first.apply_chat(chat, agp) == want
            assert second.apply_chat(chat, agp) == want


def test_cache_folder_loads_in_transformers(converted):
    """The cache is a plain Hugging Face tokenizer folder: transformers reads it back the same."""
    from transformers import AutoTokenizer
    _, second, hf, _, _ = converted
    back = AutoTokenizer.from_pretrained(second.backend.folder, local_files_only=True)
    for text in TEXTS:
        assert back.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


# -- corrupt, stale, unwritable: a stand-in file and SmolLM2's converted tokenizer -------------------


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory):
    path = _pull("smollm2-135m")
    return tok_mod.from_transformers(str(path.parent), path.name)


@pytest.fixture
def fake(tmp_path, monkeypatch, smol_hf):
    """A stand-in GGUF file whose conversion returns SmolLM2's tokenizer, and a count of conversions."""
    monkeypatch.setenv("LSTREAM_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(directory, gguf_file):
        calls.append(gguf_file)
        return smol_hf
    monkeypatch.setattr(tok_mod, "from_transformers", convert)
    model = tmp_path / "models" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF" + os.urandom(4096))

    def load():
        return Tokenizer((str(model.parent), model.name), None, None, (), False)
    return model, calls, load


def _check(t, smol_hf):
    for text in TEXTS[:8]:
        assert t.encode(text) == smol_hf.encode(text, add_special_tokens=False)


def test_cache_hit_after_first_load(fake, smol_hf):
    model, calls, load = fake
    assert load().origin == "converted from the GGUF file, cached"
    t = load()
    assert t.origin == "cache" and len(calls) == 1
    _check(t, smol_hf)
    assert t.chat_template == smol_hf.chat_template


def _corrupt_byte(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x20
    p.write_bytes(bytes(b))


def _edit_manifest(folder: Path, fn):
    m = json.loads((folder / tokenizer_cache.MANIFEST).read_text())
    fn(m)
    (folder / tokenizer_cache.MANIFEST).write_text(json.dumps(m))


def _not_a_tokenizer(folder: Path):
    (folder / "tokenizer.json").write_text("{}")
    _edit_manifest(folder, lambda m: m["files"].update({"tokenizer.json": tokenizer_cache._sha256(b"{}")}))


CORRUPTIONS = {
    "tokenizer.json byte flipped": lambda d, model: _corrupt_byte(d / "tokenizer.json"),
    "tokenizer.json truncated": lambda d, model: (d / "tokenizer.json").write_bytes(
        (d / "tokenizer.json").read_bytes()[:1000]),
    "tokenizer_config.json missing": lambda d, model: (d / "tokenizer_config.json").unlink(),
    "manifest truncated": lambda d, model: (d / tokenizer_cache.MANIFEST).write_text(
        (d / tokenizer_cache.MANIFEST).read_text()[:50]),
    "manifest missing": lambda d, model: (d / tokenizer_cache.MANIFEST).unlink(),
    "manifest not an object": lambda d, model: (d / tokenizer_cache.MANIFEST).write_text("[1, 2]"),
    "digest matches, content is no tokenizer": lambda d, model: _not_a_tokenizer(d),
    "other transformers version": lambda d, model: _edit_manifest(
        d, lambda m: m["identity"].update({"transformers": "0.0.1"})),
    "model file touched (stale)": lambda d, model: os.utime(
        model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9)),
    "model file rewritten, same size": lambda d, model: model.write_bytes(
        b"GGUF" + os.urandom(model.stat().st_size - 4)),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_or_stale_cache_is_rebuilt(fake, smol_hf, how):
    model, calls, load = fake
    load()
    folder = tokenizer_cache.folder(model)
    assert (folder / "tokenizer.json").exists()
    CORRUPTIONS[how](folder, model)
    t = load()
    assert len(calls) == 2, "a corrupt or stale cache was trusted"
    assert t.origin == "converted from the GGUF file, cached"
    _check(t, smol_hf)
    t = load()  # the rebuilt folder is valid again
    assert t.origin == "cache" and len(calls) == 2
    _check(t, smol_hf)
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_unwritable_cache_still_loads(fake, smol_hf, monkeypatch, tmp_path):
    model, calls, load = fake
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LSTREAM_CACHE", str(blocker / "models"))  # mkdir fails: NotADirectoryError
    for _ in range(2):
        t = load()
        assert t.origin == "converted from the GGUF file, cache not writable"
        _check(t, smol_hf)
    assert len(calls) == 2


def test_cache_folder_that_cannot_be_created(fake, smol_hf, monkeypatch):
    """The cache directory exists but refuses new entries (as a read-only one does for non-root)."""
    model, calls, load = fake

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tokenizer_cache.tempfile, "mkdtemp", refuse)
    t = load()
    assert t.origin == "converted from the GGUF file, cache not writable"
    _check(t, smol_hf)


def test_import_and_load_leave_the_environment_alone(converted):
    """Importing lstream and loading a tokenizer (from the cache: transformers is not imported at all)
    changes no environment variable."""
    first, _, _, _, path = converted
    code = f"""
import os, sys
before = dict(os.environ)
import lstream, lstream.loaders.tokenizer, lstream.loaders.model_file
from lstream.loaders.model_file import load_model
from lstream.loaders.tokenizer import Tokenizer
m = load_model({str(path)!r})
t = Tokenizer(m.tokenizer_source, m.chat_template, m.config.bos_id, m.config.eos_ids, m.config.add_bos)
assert t.origin == "cache", t.origin
assert "transformers" not in sys.modules
t.apply_chat([{{"role": "user", "content": "hi"}}])
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
print("ok")
"""
    env = dict(os.environ, LSTREAM_CACHE=str(Path(first.backend.folder).parent.parent))
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_VERBOSITY", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
