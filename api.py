"""The Python API: load a model with a residency and an upload policy, then eval, generate,
chat and score. Everything runs through the graph, the scheduler and the executor."""
from __future__ import annotations

import time
import warnings
from typing import Iterator

import numpy as np

from .backends.devices import NoDeviceError, NoGPUWarning, choose_device, make_cpu_backend, make_device_backend, warn_no_gpu
from .core.arch import build_graph
from .core.batch import UPLOAD_THRESHOLD
from .core.errors import NonFiniteError, OutOfMemory
from .core.executor import Executor, Profile, RunContext
from .core.kv_cache import ContextFullError, KVCache
from .core.ops import Op
from .core.options import Options
from .core.policy import AutoSplit, UploadPolicy
from .core.residency import HOST, moe_overrides
from .core.runner import Runner
from .core.sampling import Sampler, SamplerConfig
from .core.timings import Timings
from .core.scheduler import Plan, schedule


SHARES = (0.0, 0.3, 0.45, 0.6, 0.7)  # the device's fractions of the CPU layers' FFN columns that auto measures


def _depth_bucket(n_past: int) -> int:
    """0 below 1024 cached tokens, then log2 of the depth: where a decode split is measured anew."""
    return 0 if n_past < 1024 else int(n_past).bit_length() - 1


def check_sizes(n_ctx: int, n_ubatch: int) -> None:
    for name, v in (("n_ctx", n_ctx), ("n_ubatch", n_ubatch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, found {v!r}")


class Model:
    def __init__(self, loaded, n_gpu_layers: int = 0, policy: UploadPolicy | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None, n_ubatch: int = 512, device: str | None = "auto",
                 overrides: list[tuple[str, str]] = (), vram_budget: int | None = None,
                 device_backend=None, load_tokenizer: bool = True, quantize: str | None = None, no_fit: bool = False,
                 layer_major: bool | None = None, cuda_graphs: bool | None = None, options: Options | None = None,
                 n_cpu_moe: int = 0, cpu_moe: bool = False):
        """options: the run options (core/options.py); n_threads, layer_major and cuda_graphs, when
        given, override them. Without options, the defaults with the LSTREAM_* overrides.
        Without a GPU, n_gpu_layers > 0 warns (NoGPUWarning) and runs on the CPU; device="cuda", an
        override to cuda or no_fit with n_gpu_layers > 0 raise NoDeviceError (backends/devices.py).
        n_cpu_moe / cpu_moe: llama.cpp's --n-cpu-moe N / --cpu-moe: the experts of the first N layers
        (all layers) stay in host memory while the rest of those layers is resident on the device."""
        check_sizes(n_ctx, n_ubatch)
        choice = None
        if device_backend is None:  # the one rule for GPU requests (backends/devices.py)
            choice = choose_device(n_gpu_layers, overrides, device, no_fit)
            if choice.warning:
                warn_no_gpu(choice.warning)
            n_gpu_layers, overrides = choice.n_gpu_layers, choice.overrides
        if quantize:  # float weights -> GGUF blocks in host memory, before anything reads them
            from .loaders.quantize import quantize_model
            self.quantize_report = quantize_model(loaded, quantize)
        opts = options if options is not None else Options.from_env()
        self.options = opts = opts.with_(**{k: v for k, v in dict(
            n_threads=n_threads, layer_major=layer_major, cuda_graphs=cuda_graphs).items() if v is not None})
        self.loaded = loaded
        self.config = cfg = loaded.config
        self.residency = loaded.residency
        # one policy for the model and its device backend: a backend passed in without a policy for
        # the model keeps its own, else the model's (AutoSplit by default) is given to it
        own = getattr(device_backend, "policy", None) if policy is None else None
        self.policy = policy or own or AutoSplit(UPLOAD_THRESHOLD)
        if device_backend is not None and own is None:
            device_backend.set_policy(self.policy)
        self.n_ubatch = n_ubatch
        self.graph = build_graph(cfg, set(e.name for e in self.residency))
        self.cpu = make_cpu_backend(opts)
        self.device_backend = device_backend
        if choice is not None and choice.device:
            self.device_backend = make_device_backend(choice.device, self.policy, opts)
        self.backends = ([self.device_backend] if self.device_backend else []) + [self.cpu]
        self.by_name = {b.name: b for b in self.backends}
        fit_notes: list[str] = []
        free = self.device_backend.free_memory() if self.device_backend is not None else None
        if free is not None and cfg.n_expert:  # --expert-cache: VRAM the weights cannot have
            free = max(0, free - int(getattr(self.device_backend, "expert_cache_gib", 0) * 2**30))
        n_cpu_moe = cfg.n_layer if cpu_moe else max(int(n_cpu_moe or 0), 0)
        if free is not None:
            from .core.fit import fit_model  # fit before load: lower -ngl to what the free VRAM holds
            r = fit_model(self.residency, cfg, n_gpu_layers, n_ctx, n_ubatch, free,
                          n_slots=self.device_backend.ring_slots, no_fit=no_fit, n_cpu_moe=n_cpu_moe,
                          host_patterns=[p for p, d in overrides if d.lower() in ("cpu", "host")])
            n_gpu_layers, n_cpu_moe, fit_notes = r.ngl, r.n_cpu_moe, [r.note] * bool(r.note) + r.warnings
        if n_cpu_moe and cfg.n_expert and self.device_backend is not None:  # before -ot: those win
            overrides = moe_overrides(n_cpu_moe) + list(overrides)
        self.n_cpu_moe = n_cpu_moe if cfg.n_expert else 0
        self.notes = fit_notes + self.residency.assign(n_gpu_layers if self.device_backend else 0,
                                           self.device_backend.name if self.device_backend else HOST,
                                           list(overrides), vram_budget)
        if self.device_backend is not None:
            self.device_backend.attach_host(self.cpu)  # computes the experts it leaves in host memory
        for b in self.backends:
            b.load(self.residency)
        self.kv = KVCache(n_ctx, cfg.n_layer, cfg.n_head_kv, cfg.head_dim, self.residency, self.by_name)
        self.executor = Executor(self.graph, self.by_name)
        # Ubatches before the last need no logits: they run the graph without its output head.
        self.body_graph = self.graph.without_output()
        self.body_executor = Executor(self.body_graph, self.by_name)
        self.runner = Runner(self.executor, self.body_executor, self.backends, opts.layer_major, opts.cuda_graphs)
        self._plans: dict[tuple[int, bool], Plan] = {}
        self._splits: dict[int, tuple] = {}  # depth bucket -> measured decode split (_follow_depth)
        self._depth_bucket = 0
        self.profile: Profile | None = None
        self.tokenizer = None
        if load_tokenizer:
            from .loaders.tokenizer import Tokenizer
            self.tokenizer = Tokenizer(loaded.tokenizer_source, loaded.chat_template, cfg.bos_id,
                                       cfg.eos_ids, cfg.add_bos)
        self._tune_policy()
        self._apply_share()

    # -- planning ----------------------------------------------------------------------------
    def plan(self, n_tokens: int, with_output: bool = True) -> Plan:
        key = (n_tokens, with_output)
        p = self._plans.get(key)
        if p is None:
            graph = self.graph if with_output else self.body_graph
            p = self._plans[key] = schedule(graph, self.residency, self.backends, n_tokens)
        return p

    def set_policy(self, policy: UploadPolicy) -> None:
        self.policy = policy
        self._splits.clear()
        for b in self.backends:
            b.set_policy(policy)
        self._plans.clear()
        self._tune_policy()
        self._apply_share()

    def _tune_policy(self) -> None:
        """A policy that sets itself by measurement (AutoSplit) times decode steps of each setting it
        tries (core/tuning.py), on positions after the cached ones, which are kept: the CPU's share
        of the host layers, and with experts in host memory how many of a step's the device uploads."""
        pol, dev = self.policy, self.device_backend
        if not pol.needs_tuning or dev is None or not dev.real_time or self.kv.n_ctx - self.kv.n_past < 4:
            return
        pol.prepare(self.residency, dev.name)
        top_k = self.config.n_expert_used if getattr(dev, "host_experts", None) else 0
        if pol.n_host == 0 and top_k == 0:
            return
        start, tok = self.kv.n_past, int(self.config.bos_id or 0)

        def timer(attr: str):
            def step_seconds(j) -> float:
                setattr(pol, attr, j)
                self._plans.clear()
                if attr in ("cpu_layers", "share"):
                    self._apply_share()  # the shared layers follow the split
                times = []
                for _ in range(3):  # the first builds plans, programs, ring slots and graphs: not counted
                    self.kv.n_past = start
                    t0 = time.perf_counter()
                    self.eval([tok])
                    self.synchronize()
                    times.append(time.perf_counter() - t0)
                return min(times[1:])
            return step_seconds
        from .core.tuning import confirm, tune_split
        try:
            if pol.n_host:
                # (the split whose streamed layers fit the ring: they stay there, nothing is copied)
                ring = getattr(dev, "ring_slots", 0)
                cliff = pol.n_host - ring if 0 < ring < pol.n_host else pol.n_host
                if hasattr(pol, "share") and hasattr(dev, "rt"):  # the device's FFN share, at that split
                    pol.cpu_layers, f = cliff, timer("share")
                    try:
                        pol.share_measured = {s: f(s) for s in SHARES}
                        pol.share = confirm(pol.share_measured, f)
                    except (RuntimeError, OSError) as e:  # an optimization: decode goes on without it
                        warnings.warn(f"decode FFN share off: {e}", RuntimeWarning, stacklevel=2)
                        pol.share = 0.0
                        self._apply_share()
                # (and the split whose one streamed entry is the last, the output head: it stays in the ring)
                pol.cpu_layers, pol.measured = tune_split(pol.n_host, timer("cpu_layers"),
                                                          also=(cliff, pol.n_host - 1) if ring else ())
                self._depth_bucket = _depth_bucket(start)
                self._splits[self._depth_bucket] = (pol.cpu_layers, pol.measured)
            if top_k:
                pol.decode_experts, pol.experts_measured = tune_split(top_k, timer("decode_experts"))
        finally:
            self.kv.n_past = start
            self._plans.clear()
            self.runner.clear()
            self._apply_share()

    def _apply_share(self) -> None:
        """The policy's device share of the CPU's decode FFNs (LayerSplit.share) on the CPU layers of
        its split (backends/cuda/ffn_share.py)."""
        pol, dev = self.policy, self.device_backend
        frac = getattr(pol, "share", 0.0)
        if dev is None or not hasattr(dev, "rt") or (not frac and self.cpu.share is None):
            return
        from .backends.cuda import ffn_share
        first = getattr(pol, "first_host_layer", 0)  # (set by the device backend's load: LayerSplit.prepare)
        layers = range(first, min(first + getattr(pol, "cpu_layers", 0), self.config.n_layer))
        before = self.cpu.share
        ffn_share.configure(dev, self.cpu, layers, frac, {n.layer for n in self.graph.nodes if n.op is Op.GEGLU})
        if self.cpu.share is not before:  # (a program built for another share builds itself again)
            for ex in (self.executor, self.body_executor):
                ex.forget_compiled()

    def _follow_depth(self, measure: bool = True) -> None:
        """A measured decode split holds for one depth: attention over a deep cache makes the CPU's
        layers slower, so after a prompt that ends in a new depth bucket (1K, 2K, 4K... cached
        tokens) the split is measured again there, once per bucket; back at a known depth its split
        returns. The measuring steps run at the cached depth and keep the cache (_tune_policy)."""
        pol = self.policy
        bucket = _depth_bucket(self.kv.n_past)
        if not pol.needs_tuning or not getattr(pol, "measured", None) or bucket == self._depth_bucket:
            return
        hit = self._splits.get(bucket)
        if hit is None:
            if measure:
                self._tune_policy()
        else:
            self._depth_bucket = bucket
            if hit[0] != pol.cpu_layers:
                pol.cpu_layers, pol.measured = hit
                self._plans.clear()
                self.runner.clear()
                self._apply_share()

    # -- evaluation --------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self.kv.n_past

    def reset(self) -> None:
        self.kv.reset()
        self._follow_depth(measure=False)  # an empty cache: the shallow split, if it was changed

    def synchronize(self) -> None:
        for b in self.backends:
            b.synchronize()

    def eval(self, tokens, logits: str = "last") -> np.ndarray:
        """Feed tokens after those already cached, in ubatches of n_ubatch. Returns float32
        logits: (vocab,) for the last token, or (n_tokens, vocab) with logits="all"."""
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if len(tokens) == 0:
            raise ValueError("eval needs at least one token, found none")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), found {tokens.min()}..{tokens.max()}")
        self.kv.check_room(len(tokens))
        n_past = self.kv.n_past
        try:
            out = self._eval(tokens, logits)
        except NonFiniteError as err:
            self._abort()
            raise self._locate_nonfinite(tokens, n_past, err) from None
        except KeyboardInterrupt:
            self._abort()  # nothing keeps running in the background: queued copies and kernels drain
            raise
        except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(err, MemoryError) and type(err).__name__ != "OutOfMemoryError":
                raise
            self._abort()
            where = "host" if isinstance(err, MemoryError) else "device"
            raise OutOfMemory(f"out of {where} memory while evaluating {len(tokens)} tokens "
                              f"(-ub {self.n_ubatch}, -c {self.kv.n_ctx}): lower -ngl, -ub or -c; "
                              f"the model and its first {self.kv.n_past} cached tokens are kept") from None
        if len(tokens) > 1:  # a prompt: decode from here may want another split (not per token)
            self.kv.prompt_done()
            self._follow_depth()
        return out

    def _abort(self) -> None:
        """After a failed or interrupted run: wait for the work already queued, give cached device
        memory back, and keep the cache at the tokens of the runs that finished."""
        for b in self.backends:
            try:
                b.synchronize()
                b.release_memory()
            except Exception:  # noqa: BLE001 - a broken device must not hide the original error
                pass

    def _locate_nonfinite(self, tokens, n_past: int, err: NonFiniteError) -> NonFiniteError:
        """A NaN/inf was seen where values cross backends or in the logits: evaluate the same tokens
        again op by op to name the node where it first appears. The cache keeps the tokens before."""
        self.kv.n_past = n_past
        try:
            self.runner.locate_nonfinite(self._runs(tokens, "last"))
        except NonFiniteError as precise:
            err = precise
        finally:
            self._abort()
            self.kv.n_past = n_past
        return err

    def _eval(self, tokens, logits):
        return self.runner.run(self._runs(tokens, logits), all_logits=logits == "all")

    def _runs(self, tokens, logits):
        mode = "all" if logits == "all" else "last"
        runs = []
        for start in range(0, len(tokens), self.n_ubatch):
            chunk = tokens[start:start + self.n_ubatch]
            last = start + len(chunk) == len(tokens)
            head = logits == "all" or last
            ctx = RunContext(chunk, np.arange(self.kv.n_past + start, self.kv.n_past + start + len(chunk)),
                             self.kv.n_past + start, self.kv, self.residency, mode, self.profile,
                             more_ubatches=not last)
            runs.append((self.executor if head else self.body_executor, self.plan(len(chunk), with_output=head), ctx))
        return runs

    # -- text --------------------------------------------------------------------------------
    def tokenize(self, text: str, bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, bos)

    def generate_tokens(self, prompt_tokens: list[int], n_predict: int, sampler: Sampler | None = None,
                        timings: Timings | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        """Yield sampled tokens after evaluating the prompt on top of the cache."""
        sampler = sampler or Sampler(SamplerConfig(temp=0.0))
        timings = timings if timings is not None else Timings()
        history = list(prompt_tokens)
        t0 = time.perf_counter()
        logits = self.eval(prompt_tokens)
        timings.prompt_tokens += len(prompt_tokens)
        timings.prompt_s += time.perf_counter() - t0
        for i in range(n_predict):
            tok = sampler(logits, history)
            if stop_at_eos and self.tokenizer is not None and self.tokenizer.is_eos(tok):
                return
            yield tok
            history.append(tok)
            if i + 1 == n_predict or self.kv.n_past >= self.kv.n_ctx:
                return
            t0 = time.perf_counter()
            logits = self.eval([tok])
            timings.gen_tokens += 1
            timings.gen_s += time.perf_counter() - t0

    def stream(self, prompt: str, n_predict: int = 128, sampler: Sampler | None = None,
               timings: Timings | None = None, bos: bool | None = None) -> Iterator[str]:
        from .loaders.tokenizer import StreamDecoder
        dec = StreamDecoder(self.tokenizer)
        for tok in self.generate_tokens(self.tokenize(prompt, bos), n_predict, sampler, timings):
            piece = dec.push(tok)
            if piece:
                yield piece

    def generate(self, prompt: str, n_predict: int = 128, sampler: Sampler | None = None, **kw) -> str:
        self.reset()
        return "".join(self.stream(prompt, n_predict, sampler or Sampler(SamplerConfig(**kw) if kw else None)))

    def chat(self, messages: list[dict], n_predict: int = 256, sampler: Sampler | None = None) -> str:
        self.reset()
        text = self.tokenizer.apply_chat(messages)
        return "".join(self.stream(text, n_predict, sampler, bos=False))

    def perplexity(self, text: str, n_ctx: int = 512):
        from .core.perplexity import perplexity
        return perplexity(self, self.tokenize(text, bos=False), n_ctx)

    def close(self) -> None:
        for b in self.backends:
            b.unload()
        self._plans.clear()
        if self.runner is not None:
            self.runner.clear()
        self.kv = None
        if self.loaded is not None:
            self.loaded.handle = None
        # Drop every reference to the weights (memory maps, packed copies, compiled programs that
        # read them), so the maps close even while this object lives on; close() twice is harmless.
        self.loaded = self.residency = self.graph = self.body_graph = None
        self.executor = self.body_executor = self.runner = None
        self.cpu = self.device_backend = None
        self.backends, self.by_name = [], {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path, **kw) -> Model:
    """lstream.load(path_or_short_name, n_gpu_layers=0, policy=BatchThreshold(32), n_ctx=4096, ...)"""
    from .loaders.model_file import load_model
    from .loaders.registry import resolve
    return Model(load_model(resolve(path)), **kw)


__all__ = ["Model", "load", "Timings", "ContextFullError", "NoDeviceError", "NoGPUWarning"]
