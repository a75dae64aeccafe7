"""Options shared by the commands, and the one place errors become one line + exit 1."""
from __future__ import annotations

import functools
import sys

import click

from ..core.batch import UPLOAD_THRESHOLD
from ..core.errors import LStreamError


def one_line_errors(fn):
    """Expected failures print `error: <one line>` on stderr and exit 1, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (LStreamError, ValueError, OSError, MemoryError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)
    return wrapper


def model_options(fn=None, *, n_ctx: int = 4096, n_ubatch: int = 512):
    """-m/-ngl/-t/-c/-ub and the upload-policy flags, as llama.cpp spells them."""
    if fn is None:
        return lambda f: model_options(f, n_ctx=n_ctx, n_ubatch=n_ubatch)
    opts = [
        click.option("-m", "--model", default=None, help="GGUF file, safetensors directory or short name (default smollm2-135m)"),
        click.option("-ngl", "--n-gpu-layers", "ngl", type=int, default=0, show_default=True, help="layers resident on the GPU"),
        click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)"),
        click.option("-c", "--ctx-size", "n_ctx", type=int, default=n_ctx, show_default=True),
        click.option("-ub", "--ubatch-size", "n_ubatch", type=int, default=n_ubatch, show_default=True),
        click.option("-ot", "--override-tensor", "overrides", multiple=True, help="REGEX=DEVICE (cpu or cuda)"),
        click.option("--policy", default="auto", show_default=True,
                     help="upload policy for non-resident weights: auto (prefill streams from --threshold "
                          "tokens; decode splits the host layers between the CPU and streaming as measured "
                          "here), threshold, never, always, split:N (decode: CPU computes N host layers while "
                          "the rest stream) or cost (a cost model on a stored calibration)"),
        click.option("--threshold", type=int, default=32, show_default=True, help="batch size from which weights are uploaded"),
        click.option("-nopo", "--no-op-offload", "nopo", type=int, default=0, help="1: never upload non-resident weights"),
        click.option("--no-fit", "no_fit", is_flag=True, help="fail when -ngl does not fit in free VRAM (default: lower it)"),
        click.option("--quantize", type=click.Choice(["q8_0", "q4_0"]), default=None,
                     help="quantize float (safetensors) weights to GGUF blocks at load"),
        click.option("--no-cuda-graphs", "no_cuda_graphs", is_flag=True,
                     help="run resident decode steps eagerly instead of replaying CUDA graphs"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def parse_overrides(overrides) -> list[tuple[str, str]]:
    out = []
    for o in overrides:
        pattern, sep, dev = o.rpartition("=")
        if not sep or not pattern:
            raise click.BadParameter(f"expected REGEX=DEVICE, found {o!r}", param_hint="-ot")
        out.append((pattern, dev))
    return out


def build_model(loaded, ngl=0, threads=None, n_ctx=4096, n_ubatch=512, overrides=(), policy="auto",
                threshold=UPLOAD_THRESHOLD, nopo=0, load_tokenizer=True, quantize=None, no_fit=False,
                no_cuda_graphs=False, no_layer_major=False, **_):
    """The one place the CLI turns its flags into a Model (run, plan, perplexity, bench)."""
    from ..api import Model
    from ..core.options import Options
    from ..core.policy import make_policy
    pol = policy if not isinstance(policy, str) else make_policy(
        policy, threshold, bool(nopo), calibration=calibration() if policy == "cost" else None)
    opts = Options.from_env(n_threads=threads, cuda_graphs=False if no_cuda_graphs else None,
                            layer_major=False if no_layer_major else None)
    return Model(loaded, n_gpu_layers=ngl, policy=pol, n_ctx=n_ctx, n_ubatch=n_ubatch,
                 overrides=parse_overrides(overrides), load_tokenizer=load_tokenizer, quantize=quantize,
                 no_fit=no_fit, options=opts)


def load_model(model, **flags):
    from ..loaders.model_file import load_model as load_file
    from ..loaders.registry import resolve
    return build_model(load_file(resolve(model)), **flags)


def calibration():
    try:
        from ..backends.calibrate import load_or_measure
    except ImportError:
        raise LStreamError("policy 'cost' needs the CUDA backend's calibration, which is not available here") from None
    return load_or_measure()
