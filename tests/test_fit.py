"""Fit before load (core/fit.py), with fake numbers: no GPU needed."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from lstream.core.fit import GiB, MiB, FitError, fit, fit_model, needs


def model(n_layer=32, layer_bytes=256 * MiB, embd_bytes=500 * MiB, tied=False):
    """Entries shaped like a residency map: 7 matrices per layer, two norms, embedding, output."""
    es = [NS(name="token_embd.weight", layer=-1, shape=(32000, 4096), nbytes=embd_bytes, alias_of=None),
          NS(name="output_norm.weight", layer=n_layer, shape=(4096,), nbytes=4096 * 4, alias_of=None),
          NS(name="output.weight", layer=n_layer, shape=(32000, 4096), nbytes=embd_bytes,
             alias_of="token_embd.weight" if tied else None)]
    for il in range(n_layer):
        es += [NS(name=f"blk.{il}.m{j}.weight", layer=il, shape=(4096, 4096), nbytes=layer_bytes // 7,
                  alias_of=None) for j in range(7)]
        es += [NS(name=f"blk.{il}.{n}.weight", layer=il, shape=(4096,), nbytes=4096 * 4, alias_of=None)
               for n in ("attn_norm", "ffn_norm")]
    return es


KV = 64 * MiB


def test_everything_fits():
    r = fit(model(), 32, 33, free_device=40 * GiB, kv_bytes_per_layer=KV)
    assert r.ngl == 33 and r.note is None
    assert r.needs.slots == 0 and r.needs.pinned == 0  # nothing streamed
    assert r.needs.kv == 32 * KV


def test_lowers_ngl_with_one_line_note():
    es = model()
    full = needs(es, 32, 33, KV).device
    r = fit(es, 32, 33, free_device=full // 2, kv_bytes_per_layer=KV, compute_bytes=100 * MiB)
    assert 0 < r.ngl < 33
    assert r.note == f"-ngl 33 needs {(full + 100 * MiB) / GiB:.1f} GiB, {full // 2 / GiB:.1f} GiB free: using -ngl {r.ngl}"
    # the largest that fits: one more layer would not
    avail = full // 2 - 256 * MiB
    assert r.needs.device <= avail < needs(es, 32, r.ngl + 1, KV, compute_bytes=100 * MiB).device
    assert r.needs.slots == 3 * 500 * MiB  # a ring of 3 slots of the largest streamed layer: the output head


def _aligned_layer():
    per = -(-(256 * MiB // 7) // 256) * 256
    return per * 7


def test_no_fit_raises():
    with pytest.raises(FitError, match=r"-ngl 33 needs .* GiB on the device, 4\.0 GiB free \(--no-fit"):
        fit(model(), 32, 33, free_device=4 * GiB, kv_bytes_per_layer=KV, no_fit=True)


def test_nothing_fits():
    with pytest.raises(FitError, match="even -ngl 0 needs"):
        fit(model(), 32, 10, free_device=300 * MiB, kv_bytes_per_layer=KV, compute_bytes=1 * GiB)


def test_tied_head_counted_once_when_together():
    es = model(tied=True)
    apart = needs(es, 32, 33, KV)  # output layer on device, embedding on host: counted
    assert apart.weights == 32 * 7 * (256 * MiB // 7) + 500 * MiB
    untied = needs(model(), 32, 33, KV)
    assert untied.weights == apart.weights


def test_pinned_shortfall_warns():
    r = fit(model(), 32, 16, free_device=40 * GiB, kv_bytes_per_layer=KV, host_kv_bytes_per_layer=2 * KV,
            pinnable_host=1 * GiB)
    assert r.ngl == 16
    assert r.needs.pinned == 16 * _aligned_layer() + 500 * MiB + 16 * 2 * KV  # + the output head, streamed
    assert r.warnings and "pageable" in r.warnings[0]


def test_fit_model_on_a_real_residency(tmp_path):
    """The K/V and compute estimates of a real (tiny) model, and -ngl lowered by a tight budget."""
    from lstream.loaders.model_file import load_model
    from lstream.tools.tiny_models import write_gguf
    loaded = load_model(write_gguf(tmp_path / "tiny.gguf"))
    big = fit_model(loaded.residency, loaded.config, 3, n_ctx=64, n_ubatch=8, free_device=1 << 40)
    assert big.ngl == 3
    need = big.needs.device
    small = fit_model(loaded.residency, loaded.config, 3, n_ctx=64, n_ubatch=8, free_device=need - 1 + 256 * MiB)
    assert small.ngl < 3 and small.note.startswith("-ngl 3 needs")


def test_model_uses_device_free_memory(tmp_path):
    """Model asks a device backend with free_memory() and lowers -ngl before placing anything."""
    from lstream.api import Model
    from lstream.loaders.model_file import load_model
    from lstream.tools.tiny_models import write_gguf
    pytest.importorskip("torch")
    from fake_device import FakeDeviceBackend

    loaded = load_model(write_gguf(tmp_path / "tiny8.gguf", n_layer=8))
    need = [fit_model(loaded.residency, loaded.config, k, n_ctx=16, n_ubatch=8, free_device=1 << 40).needs.device
            for k in range(10)]
    free = need[9] - 1  # -ngl 9 (everything) misses by one byte
    expect = max(k for k in range(9) if need[k] <= free)

    class Tight(FakeDeviceBackend):
        def free_memory(self):
            return 256 * MiB + free  # the reserve plus all but one byte of -ngl 9

    m = Model(loaded, n_gpu_layers=9, n_ctx=16, n_ubatch=8, device_backend=Tight(), load_tokenizer=False)
    try:
        assert 0 < expect < 9
        assert any(n.startswith("-ngl 9 needs") and n.endswith(f"using -ngl {expect}") for n in m.notes), m.notes
        assert m.eval([1, 2]).shape == (16,)
    finally:
        m.close()
    with pytest.raises(FitError):
        Model(load_model(tmp_path / "tiny8.gguf"), n_gpu_layers=9, n_ctx=16, n_ubatch=8, device_backend=Tight(),
              load_tokenizer=False, no_fit=True)
