"""`lstream info`: model metadata and the residency map per layer."""
from __future__ import annotations

import click

from .checks import at_least
from .common import MODEL_HELP, choose_device, one_line_errors


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


@click.command()
@click.option("-m", "--model", default=None, help=MODEL_HELP)
@click.option("-ngl", "--n-gpu-layers", "ngl", type=at_least(0), default=0, show_default=True,
              help="layers resident on the GPU, as run would place them here")
@click.option("-ncmoe", "--n-cpu-moe", "n_cpu_moe", type=at_least(0), default=0,
              help="MoE: experts of the first N layers on the host")
@click.option("-cmoe", "--cpu-moe", "cpu_moe", is_flag=True, help="MoE: every layer's experts on the host")
@click.option("--tensors", is_flag=True, help="list every tensor, not only per layer")
@one_line_errors
def info(model, ngl, tensors, n_cpu_moe=0, cpu_moe=False):
    """Model metadata and the residency map per layer (where run would place them on this machine)."""
    from ..core.residency import HOST, moe_overrides
    from ..loaders.model_file import load_model as load_file
    from ..loaders.registry import resolve
    choice = choose_device(ngl)
    m = load_file(resolve(model))
    cfg, rmap = m.config, m.residency
    rmap.assign(choice.n_gpu_layers, "cuda" if choice.device else HOST,
                moe_overrides(cfg.n_layer if cpu_moe else n_cpu_moe) if choice.device else [])
    click.echo(f"file: {m.path} ({m.format})")
    click.echo(f"devices: {'cuda, cpu' if choice.gpu else f'cpu only (no GPU here: {choice.why})'}")
    click.echo(f"architecture: {cfg.arch}  name: {cfg.name}")
    click.echo(f"layers {cfg.n_layer}, embd {cfg.n_embd}, ffn {cfg.n_ff}, heads {cfg.n_head}/{cfg.n_head_kv} kv, "
               f"head_dim {cfg.head_dim}, vocab {cfg.vocab_size}, ctx_train {cfg.n_ctx_train}")
    click.echo(f"rope: base {cfg.rope_base:g}, dims {cfg.rope_dim}, mode {cfg.rope_mode}; rms eps {cfg.rms_eps:g}")
    click.echo(f"params {m.n_params / 1e6:.1f} M, size {_fmt_bytes(rmap.total_bytes())}, chat template: "
               f"{'yes' if m.chat_template else 'no'}")
    if cfg.n_expert:
        click.echo(f"experts: {cfg.n_expert} per MoE layer, {cfg.n_expert_used} per token, ffn {cfg.n_ff_exp}, "
                   f"top-k weights {'renormalized' if cfg.expert_norm else 'as routed'}")
    click.echo("")
    click.echo(f"{'layer':>6} {'tensors':>7} {'bytes':>12} {'types':<18} home")
    for layer in range(-1, cfg.n_layer + 1):
        es = rmap.layer(layer)
        if not es:
            continue
        types = ",".join(sorted({e.qtype.name for e in es}))
        homes = ",".join(sorted({e.home for e in es}))
        nbytes = sum(e.nbytes for e in es if e.alias_of is None or e.home != rmap[e.alias_of].home)
        click.echo(f"{rmap.layer_name(layer):>6} {len(es):>7} {_fmt_bytes(nbytes):>12} {types:<18} {homes}")
        units = rmap.experts(layer)
        if units:  # the layer's experts as units: what --n-cpu-moe places and the device uploads
            click.echo(f"{'':>8}experts {len(units)} x {_fmt_bytes(units[0].nbytes)} "
                       f"({', '.join(n.split('.')[2] for n in units[0].names)}) on {units[0].home}")
        if tensors:
            for e in es:
                alias = f" (shares {e.alias_of})" if e.alias_of else ""
                click.echo(f"{'':>8}{e.name:<32} {e.qtype.name:<5} {str(e.shape):<16} {e.nbytes:>10} "
                           f"{e.home} {e.state.value}{alias}")
