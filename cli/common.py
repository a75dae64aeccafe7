"""Options shared by the commands, and the one place errors become one line + exit 1."""
from __future__ import annotations

import functools
import os
import re
import sys

import click

from ..core.batch import EXPERT_UPLOAD_THRESHOLD, UPLOAD_THRESHOLD
from ..core.errors import LStreamError
from .bench_params import check_policy, parse_shares
from .checks import at_least, check_threads, end_line, reset_line


def one_line_errors(fn):
    """Expected failures print `error: <one line>` on stderr (on a line of its own) and exit 1,
    without a traceback; so does anything unexpected, as an internal error (LSTREAM_DEBUG=1 shows
    its traceback). click's own usage errors pass through (exit 2)."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        reset_line()
        try:
            return fn(*a, **kw)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            end_line()
            raise
        except BrokenPipeError:  # `lstream ... | head`: the reader left; quiet, as a tool killed by SIGPIPE
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            sys.exit(141)
        except (LStreamError, ValueError, OSError, MemoryError) as e:
            fail(_first_line(e))
        except Exception as e:  # noqa: BLE001 - a bug: still one line, never a traceback
            if os.environ.get("LSTREAM_DEBUG") == "1":
                raise
            fail(f"internal error: {type(e).__name__}: {_first_line(e)} (LSTREAM_DEBUG=1 shows where)")
    return wrapper


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def fail(msg: str) -> None:
    end_line()
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


MODEL_HELP = ("GGUF file (or the first part of a split one), safetensors directory, or a known short name: "
              "smollm2-135m (default), gemma3-270m")


def model_options(fn=None, *, n_ctx: int = 4096, min_ctx: int = 1, n_ubatch: int = 512):
    """-m/-ngl/-t/-c/-ub and the upload-policy flags, as llama.cpp spells them. -c takes 0 (the
    model's training context) or at least min_ctx."""
    if fn is None:
        return lambda f: model_options(f, n_ctx=n_ctx, min_ctx=min_ctx, n_ubatch=n_ubatch)

    def check_ctx(ctx, param, value):
        if 0 < value < min_ctx:
            raise click.BadParameter(f"expected 0 (the model's training context) or {min_ctx} or more, found {value}")
        return value
    opts = [
        click.option("-m", "--model", default=None, help=MODEL_HELP),
        click.option("-ngl", "--n-gpu-layers", "ngl", type=at_least(0), default=0, show_default=True,
                     help="layers resident on the GPU (without a GPU: a warning, and the CPU runs them)"),
        click.option("-t", "--threads", type=int, default=None, callback=check_threads,
                     help="CPU threads (default: physical cores)"),
        click.option("-c", "--ctx-size", "n_ctx", type=at_least(0), default=n_ctx, show_default=True, callback=check_ctx,
                     help="context size in tokens (0: the model's training context)"),
        click.option("-ub", "--ubatch-size", "n_ubatch", type=at_least(1), default=n_ubatch, show_default=True),
        click.option("-ot", "--override-tensor", "overrides", multiple=True,
                     help="REGEX=DEVICE (cpu or cuda; cuda without a GPU is an error)"),
        click.option("--policy", default="auto", show_default=True, callback=check_policy,
                     help="upload policy for non-resident weights: auto (prefill streams from --threshold "
                          "tokens; decode splits the host layers between the CPU and streaming as measured "
                          "here), threshold, never, always, split:N (decode: CPU computes N host layers while "
                          "the rest stream; split:N:F: the device computes a fraction F of their FFN meanwhile) or cost (a cost model on a stored calibration)"),
        click.option("--threshold", type=at_least(1), default=32, show_default=True, help="batch size from which weights are uploaded"),
        click.option("-nopo", "--no-op-offload", "nopo", type=click.IntRange(0, 1), default=0, help="1: never upload non-resident weights"),
        click.option("--no-fit", "no_fit", is_flag=True, help="fail when -ngl does not fit in free VRAM (default: lower it)"),
        click.option("--quantize", type=click.Choice(["q8_0", "q4_0"]), default=None,
                     help="quantize float (safetensors) weights to GGUF blocks at load"),
        click.option("--no-cuda-graphs", "no_cuda_graphs", is_flag=True,
                     help="run resident decode steps eagerly instead of replaying CUDA graphs"),
        # mixtures of experts, as llama.cpp spells them
        click.option("-ncmoe", "--n-cpu-moe", "n_cpu_moe", type=int, default=0, show_default=True,
                     help="MoE: keep the experts of the first N layers in host memory"),
        click.option("-cmoe", "--cpu-moe", "cpu_moe", is_flag=True, help="MoE: keep every layer's experts in host memory"),
        click.option("--expert-cache", "expert_cache", type=click.FloatRange(min=0), default=0, show_default=True,
                     metavar="GIB", help="MoE: VRAM for the recently routed experts of host-expert layers in decode "
                                         "(least recently used evicted; hits computed on the GPU)"),
        click.option("--moe-share", "moe_share", default=None, callback=_share_option, metavar="N|auto",
                     help="MoE: routed experts per token a host-expert decode layer copies to the GPU and computes "
                          "there  [default: auto, half of them; 0: none]"),
        click.option("--expert-threshold", "expert_threshold", type=int, default=None,
                     help=f"MoE: tokens of a ubatch routed to one host expert from which it is uploaded "
                          f"(default {EXPERT_UPLOAD_THRESHOLD}; fewer: computed on the CPU)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def parse_overrides(overrides) -> list[tuple[str, str]]:
    """-ot REGEX=DEVICE, each checked: a regular expression, and cpu or cuda."""
    from ..backends.devices import check_device_name
    out = []
    for o in overrides:
        pattern, sep, dev = o.rpartition("=")
        if not sep or not pattern:
            raise click.BadParameter(f"expected REGEX=DEVICE, found {o!r}", param_hint="-ot")
        try:
            re.compile(pattern)
        except re.error as e:
            raise click.BadParameter(f"{pattern!r} is not a regular expression ({e})", param_hint="-ot") from None
        try:
            check_device_name(dev, "-ot")
        except ValueError as e:
            raise click.BadParameter(str(e).removeprefix("-ot: "), param_hint="-ot") from None
        out.append((pattern, dev))
    return out


def choose_device(ngl=0, overrides=(), no_fit=False, names=None, **_):
    """The device rule (backends/devices.py) for the CLI's flags: a warning is printed here, an
    explicit request that cannot be honoured raises NoDeviceError (one error line)."""
    from ..backends.devices import CLI_NAMES
    from ..backends.devices import choose_device as choose
    choice = choose(ngl, parse_overrides(overrides), "auto", no_fit, names={**CLI_NAMES, **(names or {})})
    if choice.warning:
        click.echo(f"warning: {choice.warning}", err=True)
    return choice


def _share_option(ctx, param, value):
    """--moe-share N|auto -> N, or MOE_SHARE_AUTO (-1); None when not given (the environment's, else auto)."""
    if value is None:
        return None
    got = parse_shares(value)
    if len(got) != 1:
        raise click.BadParameter(f"expected one count of experts or 'auto', found {value!r}")
    return got[0]


def build_model(loaded, ngl=0, threads=None, n_ctx=4096, n_ubatch=512, overrides=(), policy="auto",
                threshold=UPLOAD_THRESHOLD, nopo=0, load_tokenizer=True, quantize=None, no_fit=False,
                no_cuda_graphs=False, no_layer_major=False, choice=None, n_cpu_moe=0, cpu_moe=False,
                expert_threshold=None, act8=None, expert_cache=0, moe_share=None, **_):
    """The one place the CLI turns its flags into a Model (run, plan, perplexity, bench).
    choice: the device rule's answer, when the caller applied it before loading the file."""
    from ..api import Model
    from ..core.options import Options
    from ..core.policy import make_policy
    choice = choice or choose_device(ngl, overrides, no_fit)
    pol = policy if not isinstance(policy, str) else make_policy(
        policy, threshold, bool(nopo), calibration=calibration() if policy == "cost" else None,
        expert_threshold=expert_threshold)
    opts = Options.from_env(n_threads=threads, cuda_graphs=False if no_cuda_graphs else None,
                            layer_major=False if no_layer_major else None, cpu_act8=act8,
                            expert_cache_gib=float(expert_cache or 0), moe_share=moe_share)
    return Model(loaded, n_gpu_layers=choice.n_gpu_layers, policy=pol, device=choice.device,
                 n_ctx=n_ctx or loaded.config.n_ctx_train, n_ubatch=n_ubatch, overrides=list(choice.overrides),
                 load_tokenizer=load_tokenizer, quantize=quantize, no_fit=no_fit, options=opts,
                 n_cpu_moe=n_cpu_moe or 0, cpu_moe=cpu_moe)


def load_model(model, **flags):
    """-m's model with the flags; the device rule first, so that a request this machine cannot
    honour fails before the file is read."""
    from ..loaders.model_file import load_model as load_file
    from ..loaders.registry import resolve
    choice = choose_device(**flags)
    return build_model(load_file(resolve(model)), choice=choice, **flags)


def calibration():
    from ..backends.devices import require_gpu
    require_gpu("policy 'cost' (a cost model on a calibration measured on the GPU)")
    try:
        from ..backends.calibrate import load_or_measure
    except ImportError:
        raise LStreamError("policy 'cost' needs the CUDA backend's calibration, which is not available here") from None
    return load_or_measure()
