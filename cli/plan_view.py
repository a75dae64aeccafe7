"""Printing a plan: per layer the backend, the cause and the bytes to move (or every node)."""
from __future__ import annotations

from collections import Counter, defaultdict

import click


def print_plan(model, plan, verbose: bool = False) -> None:
    rmap = model.residency
    click.echo(f"plan for a ubatch of {plan.n_tokens} tokens, policy {model.policy.describe()}, "
               f"backends {' > '.join(b.name for b in model.backends)}")
    click.echo(f"{len(plan.splits)} splits; {plan.upload_bytes / 2**20:.1f} MiB of weights uploaded per run")
    if model.device_backend is None:
        from ..backends.devices import gpu_status
        gpu, why = gpu_status()
        if not gpu:
            click.echo(f"no GPU here ({why}): every op runs on the CPU")
    if verbose:
        _print_experts(model, plan)
        for i, s in enumerate(plan.splits):
            copies = f" (copies in: {', '.join(model.graph.nodes[c].name for c in s.copy_inputs)})" if s.copy_inputs else ""
            click.echo(f"split {i}: {s.backend}{copies}")
            for a in s.assignments:
                up = f"  upload {sum(rmap[w].nbytes for w in a.uploads)} B" if a.uploads else ""
                click.echo(f"    {a.node.name:<24} {a.node.op.value:<10} {a.backend:<5} {a.cause}{up}")
        return
    rows = defaultdict(list)
    for a in plan.assignments():
        rows[a.node.layer].append(a)
    click.echo(f"{'layer':>6}  {'home':<6} {'runs on':<10} {'upload':>10}  cause")
    for layer in sorted(rows):
        asg = rows[layer]
        homes = ",".join(sorted({rmap[w].home for a in asg for w in a.node.weights})) or "-"
        where = ",".join(dict.fromkeys(a.backend for a in asg))
        up = sum(rmap[w].nbytes for a in asg for w in a.uploads)
        causes = Counter(a.cause.split(":")[0] if a.cause.startswith("offload") else a.cause
                         for a in asg if a.node.weights or a.node.op.value == "attention")
        cause = "; ".join(f"{c}" + (f" x{n}" if n > 1 else "") for c, n in causes.most_common(2))
        click.echo(f"{rmap.layer_name(layer):>6}  {homes:<6} {where:<10} {up / 2**20:>8.2f}M  {cause}")
    _print_experts(model, plan)


def _print_experts(model, plan) -> None:
    """A MoE model: per layer, its experts (count, bytes each, home), where the expert op runs and why."""
    rmap, cfg = model.residency, model.config
    moe = [a for a in plan.assignments() if a.node.op.value == "moe"]
    if not moe:
        return
    pol = getattr(model.device_backend, "policy", None) or model.policy  # the one that decides uploads
    click.echo(f"experts: {cfg.n_expert} per MoE layer, {cfg.n_expert_used} per token; a host expert is uploaded "
               f"when {pol.expert_threshold}+ tokens of a ubatch are routed to it ({pol.describe()})")
    click.echo(f"{'layer':>6}  {'experts':>7} {'each':>10}  {'home':<6} {'runs on':<8} cause")
    dev = model.device_backend
    for a in moe:
        units = rmap.experts(a.node.layer)
        cause = a.cause
        if dev is not None and a.backend != dev.name and units and units[0].home != dev.name:
            cause += f" ({dev.offload_op(a.node, plan.n_tokens, rmap)[1]})"  # why the device left it there
        each = units[0].nbytes / 2**20 if units else 0.0
        click.echo(f"{rmap.layer_name(a.node.layer):>6}  {len(units):>7} {each:>8.2f}M  {units[0].home if units else '-':<6} "
                   f"{a.backend:<8} {cause}")
