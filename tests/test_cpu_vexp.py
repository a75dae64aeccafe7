"""The vectorized exp (backends/cpu/vmath.py) against numpy: ~2 ulp where the result is a normal
float, and exactly 0 far below (a long softmax must not hand every far key a denormal weight)."""
import numpy as np

from lstream.backends.cpu.vmath import vexp


def test_vexp_matches_numpy_and_flushes_far_negatives():
    x = np.concatenate([np.linspace(-63.9, 80, 1001, dtype=np.float32), np.float32([-64.5, -70, -80, -200, -1e30])])
    got = x.copy()
    vexp(got, 0, len(got))
    want = np.exp(np.clip(x, -80, 80).astype(np.float64))
    normal = x >= -63.9
    assert np.allclose(got[normal], want[normal], rtol=5e-7, atol=0)
    assert (got[~normal] == 0).all()
    tail = x[-3:].copy()  # the scalar tail (n % 8 elements) follows the same rule
    vexp(tail, 0, 3)
    assert (tail == 0).all()
