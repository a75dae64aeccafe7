"""`lstream bench`: llama-bench's flags, test names, timing and output formats."""
from __future__ import annotations

import datetime
import itertools
import platform
import sys
from collections import Counter

import click

from .bench_output import (csv_text, json_text, jsonl_line, markdown_header, markdown_row, sql_create,
                           sql_insert)
from .bench_params import check_pairs, check_policies, parse_pairs, parse_shares, parse_values, values_option
from .checks import at_least, threads_warning
from .common import build_model, calibration, choose_device, one_line_errors
from .profile_opts import profile_options


def model_type(loaded) -> str:
    n = loaded.n_params
    label = f"{n / 1e9:.0f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    by_type = Counter()
    for e in loaded.residency:
        if e.layer >= 0 and len(e.shape) == 2 and e.alias_of is None:
            by_type[e.qtype.name] += e.nbytes
    return f"{loaded.config.arch} {label} {by_type.most_common(1)[0][0] if by_type else '?'}"


def _emit(fmt: str, text: str, stream) -> None:
    stream.write(text)
    stream.flush()


class Printer:
    """Streams rows in one format to one stream; markdown/csv/sql print a header before the first row."""

    def __init__(self, fmt: str, stream, varied: list[str], gpu: bool):
        self.fmt, self.stream, self.varied, self.gpu = fmt, stream, varied, gpu
        self.rows: list[dict] = []

    def start(self):
        if self.fmt == "md":
            _emit(self.fmt, markdown_header(self.varied, self.gpu) + "\n", self.stream)
        elif self.fmt == "csv":
            _emit(self.fmt, csv_text([], header=True), self.stream)
        elif self.fmt == "sql":
            _emit(self.fmt, sql_create(), self.stream)

    def row(self, row: dict, test: str):
        self.rows.append(row)
        if self.fmt == "md":
            _emit(self.fmt, markdown_row(row, self.varied, self.gpu, test) + "\n", self.stream)
        elif self.fmt == "csv":
            _emit(self.fmt, csv_text([row], header=False), self.stream)
        elif self.fmt == "jsonl":
            _emit(self.fmt, jsonl_line(row), self.stream)
        elif self.fmt == "sql":
            _emit(self.fmt, sql_insert(row), self.stream)

    def finish(self):
        if self.fmt == "json":
            _emit(self.fmt, json_text(self.rows), self.stream)


FORMATS = click.Choice(["md", "csv", "json", "jsonl", "sql", "none"])


@click.command()
@click.option("-m", "--model", "models", multiple=True, help="model (repeatable); default smollm2-135m")
@click.option("-p", "--n-prompt", "p", multiple=True, default=["512"], show_default=True, callback=values_option(0))
@click.option("-n", "--n-gen", "n", multiple=True, default=["128"], show_default=True, callback=values_option(0))
@click.option("-pg", "pg", multiple=True, callback=check_pairs, help="PP,TG: prompt then generation, timed together")
@click.option("-d", "--n-depth", "d", multiple=True, default=["0"], show_default=True, callback=values_option(0))
@click.option("-b", "--batch-size", "b", multiple=True, default=["2048"], show_default=True, callback=values_option(1))
@click.option("-ub", "--ubatch-size", "ub", multiple=True, default=["512"], show_default=True,
              callback=values_option(1))
@click.option("-ngl", "--n-gpu-layers", "ngl", multiple=True, default=None, callback=values_option(0),
              help="default 99 with a GPU, else 0 (without a GPU, values above 0 run as 0, with a warning)")
@click.option("-t", "--threads", "t", multiple=True, default=None, callback=values_option(1),
              help="default: physical cores")
@click.option("-nopo", "--no-op-offload", "nopo", multiple=True, default=["0"], show_default=True,
              callback=values_option(0, 1))
@click.option("-fa", "--flash-attn", "fa", multiple=True, default=["0"], show_default=True, callback=values_option(0, 1))
@click.option("-ot", "--override-tensor", "ot", default=None, help="REGEX=DEVICE[;REGEX=DEVICE...]")
@click.option("-ncmoe", "--n-cpu-moe", "ncmoe", multiple=True, default=["0"], show_default=True,
              callback=values_option(0), help="MoE: the experts of the first N layers stay on the host")
@click.option("-cmoe", "--cpu-moe", "cpu_moe", is_flag=True, help="MoE: every layer's experts stay on the host")
@click.option("--expert-cache", "expert_cache", type=click.FloatRange(min=0), default=0, show_default=True,
              metavar="GIB", help="MoE: VRAM for recently routed host experts in decode (LRU; hits on the GPU)")
@click.option("--moe-share", "moe_share", multiple=True, default=["auto"], show_default=True, callback=lambda c, p, v: [x for t in v or () for x in parse_shares(t)],
              help="MoE: routed experts per token a host-expert decode layer copies to the GPU and computes there "
                   "(auto: half of them; a list: one load)")
@click.option("--policy", "policies", multiple=True, default=["auto"], show_default=True, callback=check_policies,
              help="auto|threshold|never|always|split:N[:SHARE]|cost (comma list)")
@click.option("--threshold", "thresholds", multiple=True, default=["32"], show_default=True,
              callback=values_option(1))
@click.option("-r", "--repetitions", "reps", type=at_least(1), default=5, show_default=True)
@click.option("-o", "--output", "fmt", type=FORMATS, default="md", show_default=True)
@click.option("-oe", "--output-err", "fmt_err", type=FORMATS, default="none", show_default=True)
@click.option("--progress", is_flag=True, help="print progress to stderr")
@click.option("-v", "--verbose", is_flag=True)
@click.option("--no-warmup", is_flag=True)
@click.option("--no-cuda-graphs", "no_cuda_graphs", is_flag=True, help="resident decode steps run eagerly")
@click.option("--no-layer-major", "no_layer_major", is_flag=True,
              help="stream a prompt's ubatches one after another (each re-streams every layer)")
@profile_options
@one_line_errors
def bench(models, p, n, pg, d, b, ub, ngl, t, nopo, fa, ot, policies, thresholds, reps, fmt, fmt_err,
          progress, verbose, no_warmup, profile, trace, no_cuda_graphs=False, no_layer_major=False, ncmoe=("0",),
          cpu_moe=False, expert_cache=0, moe_share=(-1,)):
    """Benchmark prompt processing (pp) and generation (tg) like llama-bench.

    Every numeric option takes comma lists and ranges (first-last, first-last+step,
    first-last*mult); the run is their cross product. --profile prints a per-phase table after
    each test (stderr); --trace FILE.json writes the last test's timed repetitions as a trace."""
    from ..backends.devices import cuda_available
    from ..loaders.registry import resolve

    gpu = cuda_available()
    grid, tests, ds = _grid(p, n, pg, d, b, ub, ngl, t, nopo, fa, policies, thresholds, gpu)
    grid["moe_share"] = list(moe_share)
    moe = [10 ** 6] if cpu_moe else [v for text in ncmoe for v in parse_values(text, "-ncmoe")]
    choose_device(0, ot.split(";") if ot else ())  # a bad -ot, or cuda without a GPU, fails before any load
    varied = [k for k, v in grid.items() if len(v) > 1] + ["n_cpu_moe"] * (len(moe) > 1 or cpu_moe)
    printers = [Printer(fmt, sys.stdout, varied, gpu)] + ([Printer(fmt_err, sys.stderr, varied, gpu)]
                                                         if fmt_err != "none" else [])
    for pr in printers:
        pr.start()
    run = _Run(grid, tests, ds, reps, ot, verbose, progress, no_warmup, profile, trace, no_cuda_graphs, no_layer_major,
               expert_cache=expert_cache, moe_share=grid["moe_share"][0], n_total=len(models or [None]) * len(moe) * len(list(itertools.product(*grid.values()))) * len(tests) * len(ds))
    try:
        for model_path in (models or [None]):
            path = resolve(model_path)
            for n_gpu, n_moe in itertools.product(grid["n_gpu_layers"], moe):  # each reloads the model
                for row, name in run.model_rows(path, n_gpu, n_moe):
                    for pr in printers:
                        pr.row(row, name)
    except KeyboardInterrupt:
        click.echo("interrupted: printing the rows that finished", err=True)
        for pr in printers:
            pr.finish()
        sys.exit(130)
    for pr in printers:
        pr.finish()


def _grid(p, n, pg, d, b, ub, ngl, t, nopo, fa, policies, thresholds, gpu: bool):
    """The parameter grid (llama-bench's cross product), the (pp, tg) tests and the depths."""
    from ..backends.cpu import physical_cores

    def values(opt, name):
        return [v for text in opt for v in parse_values(text, name)]
    grid = {
        "n_gpu_layers": values(ngl or (["99"] if gpu else ["0"]), "-ngl"),
        "n_threads": values(t or [str(physical_cores())], "-t"),
        "n_batch": values(b, "-b"), "n_ubatch": values(ub, "-ub"),
        "no_op_offload": values(nopo, "-nopo"), "flash_attn": values(fa, "-fa"),
        "policy": [x for text in policies for x in text.split(",")],
        "threshold": values(thresholds, "--threshold"),
    }
    on_gpu = [x for x in grid["n_gpu_layers"] if x > 0]
    if not gpu and on_gpu:  # the device rule: a warning, and these rows run (and say) -ngl 0
        choose_device(max(on_gpu), names={"ngl": "-ngl " + ",".join(map(str, on_gpu))})
        grid["n_gpu_layers"] = [0]
    for x in dict.fromkeys(grid["n_threads"]):
        threads_warning(x)
    ps, ns, ds = values(p, "-p"), values(n, "-n"), values(d, "-d")
    tests = [(x, 0) for x in ps if x > 0] + [(0, x) for x in ns if x > 0] + \
        [pair for text in pg for pair in parse_pairs(text, "-pg")]
    return grid, tests, ds


class _Run:
    """One `lstream bench` invocation: loads each (model, -ngl) once and yields a row per test."""

    def __init__(self, grid, tests, ds, reps, ot, verbose, progress, no_warmup, profile, trace, no_cuda_graphs,
                 no_layer_major, n_total, expert_cache=0, moe_share=0):
        self.grid, self.tests, self.ds, self.reps, self.ot = grid, tests, ds, reps, ot
        self.verbose, self.progress, self.no_warmup, self.profile, self.trace = verbose, progress, no_warmup, profile, trace
        self.no_cuda_graphs, self.no_layer_major, self.n_total, self.done = no_cuda_graphs, no_layer_major, n_total, 0
        self.n_ctx = max([pp + tg for pp, tg in tests] or [1]) + max(ds)
        self.expert_cache, self.moe_share = expert_cache, moe_share

    def model_rows(self, path, n_gpu, n_cpu_moe=0):
        import time

        from ..core.policy import make_policy
        from ..loaders.model_file import load_model
        t_load = time.perf_counter()
        loaded = load_model(path)
        model = build_model(loaded, n_gpu, self.grid["n_threads"][0], self.n_ctx,
                            overrides=self.ot.split(";") if self.ot else (), load_tokenizer=False,
                            no_cuda_graphs=self.no_cuda_graphs, no_layer_major=self.no_layer_major,
                            n_cpu_moe=min(n_cpu_moe, loaded.config.n_layer), expert_cache=self.expert_cache,
                            moe_share=self.moe_share)
        if self.verbose:
            click.echo(f"lstream-bench: loaded {path} ({model_type(loaded)}, ngl {n_gpu}, "
                       f"{' + '.join(b.describe() for b in model.backends)}) in "
                       f"{time.perf_counter() - t_load:.2f} s, context {self.n_ctx}", err=True)
        g = self.grid
        try:
            for threads, nb, nub, no_off, flash, pol, thr, share in itertools.product(
                    g["n_threads"], g["n_batch"], g["n_ubatch"], g["no_op_offload"], g["flash_attn"], g["policy"],
                    g["threshold"], g["moe_share"]):
                model.cpu.set_threads(threads)
                if model.device_backend is not None:  # (a CPU-only model has no share to set)
                    model.device_backend.moe_share = share
                model.n_ubatch = nub
                model.set_policy(make_policy(pol, thr, bool(no_off), calibration=calibration() if pol == "cost" else None))
                for (pp, tg), depth in itertools.product(self.tests, self.ds):
                    r = self._test(model, loaded, path, n_gpu, threads, nb, nub, pp, tg, depth)
                    yield dict(_row(model, loaded, path, r, nb, nub, threads, n_gpu, no_off, flash, pp, tg, depth, thr),
                               moe_share="auto" if share < 0 else share), r.name
        finally:
            model.close()

    def _test(self, model, loaded, path, n_gpu, threads, nb, nub, pp, tg, depth):
        from ..core import profile as prof_mod
        from ..core.benchmark import run_test
        self.done += 1
        tag = f"lstream-bench: benchmark {self.done}/{self.n_total}"
        say = (lambda msg: click.echo(f"{tag}: {msg}", err=True)) if self.progress else None
        if say:
            say(f"starting ({path.name} ngl={n_gpu} t={threads} b={nb} ub={nub} "
                f"policy={model.policy.describe()} pp{pp} tg{tg} d{depth})")
        if self.profile or self.trace:
            prof_mod.start(model, trace=bool(self.trace))
        try:
            r = run_test(model, pp, tg, depth, self.reps, nb, warmup=not self.no_warmup, progress=say)
        finally:
            prof, model.profile = model.profile, None
        if self.verbose:
            measured = getattr(model.policy, "measured", None)  # AutoSplit: seconds per step by CPU layers
            tried = (", split steps (ms) " + " ".join(f"{j}:{s * 1e3:.1f}" for j, s in sorted(measured.items()))
                     if measured else "")
            shares = getattr(model.policy, "share_measured", None)  # and by the device's FFN share
            tried += (", share steps (ms) " + " ".join(f"{f:g}:{s * 1e3:.1f}" for f, s in sorted(shares.items()))
                      if shares else "")
            click.echo(f"lstream-bench: {r.name}: policy {model.policy.describe()}{tried}, samples_ns {r.samples_ns}",
                       err=True)
        if prof is not None and self.profile:
            click.echo(prof_mod.table(prof, loaded.config.n_layer, f"{r.name} t={threads} ub={nub} "
                                      f"{model.policy.describe()}, {self.reps} reps"), err=True)
        if prof is not None and self.trace:
            prof_mod.write_trace(prof, loaded.config.n_layer, self.trace)
        return r


def _row(model, loaded, path, r, nb, nub, threads, n_gpu, no_off, flash, pp, tg, depth, thr) -> dict:
    """llama-bench's fields, then lstream's."""
    return dict(
        build_commit="", build_number=0, cpu_info=platform.processor() or platform.machine(),
        gpu_info="", backends="CUDA" if model.device_backend else "CPU",
        model_filename=str(path), model_type=model_type(loaded),
        model_size=loaded.residency.total_bytes(), model_n_params=loaded.n_params,
        n_batch=nb, n_ubatch=nub, n_threads=threads, type_k="f32", type_v="f32",
        n_gpu_layers=n_gpu, no_op_offload=no_off, flash_attn=flash, n_prompt=pp,
        n_gen=tg, n_depth=depth,
        test_time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        avg_ns=int(r.avg_ns), stddev_ns=int(r.stddev_ns), avg_ts=r.avg_ts,
        stddev_ts=r.stddev_ts, samples_ns=r.samples_ns, samples_ts=r.samples_ts,
        n_cpu_moe=model.n_cpu_moe, policy=model.policy.describe(), threshold=thr,
        **stream_fields(model))


def stream_fields(model) -> dict:
    """Bytes streamed to the device, achieved GB/s and share of copy hidden, when a device backend streams."""
    s = model.device_backend.stream_stats() if model.device_backend is not None else {}
    return {"bytes_streamed": s.get("bytes", 0), "stream_gbps": s.get("gbps", 0.0),
            "copy_hidden": s.get("hidden", 0.0)}
