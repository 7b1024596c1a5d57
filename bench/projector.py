"""Batched cross-attention vs the seed's per-image loop, forward+backward, side by side.

It times revision 1 (`SlotCrossAttentionProjector`, slots reading through attention only), the design
the seed looped over images; revision 2's attention blocks are the same batched code.

Why: the design (fix 5) replaces the seed's Python loop over images with one batched attention over
all images of the batch. This script measures what that buys on the same math and the same parameter
count: the loop baseline is the seed design written *correctly* (all patches of image i as keys/values,
learned slot queries, layer-input residuals), run with `nn.MultiheadAttention` one image at a time.

Run: `python -m bench.projector` (Qwen3-0.6B / CLIP-B/16 sizes, ~2-3 min on 2 cores) or
`python -m bench.projector --quick` (tiny sizes, a few seconds; for CI).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from vlm_peft.model.config import VLMConfig
from vlm_peft.model.projector import build_projector, init_weights, sincos_2d, trunc_normal


@dataclass
class Sizes:
    hidden: int
    vision_dim: int
    num_patches: int
    images: int
    heads: int
    layers: int
    ffn_mult: int
    repeats: int
    warmup: int
    queries: tuple[int, ...]


FULL = Sizes(
    hidden=1024,
    vision_dim=768,
    num_patches=196,
    images=8,
    heads=8,
    layers=2,
    ffn_mult=4,
    repeats=7,
    warmup=2,
    queries=(64, 196),
)
QUICK = Sizes(
    hidden=64,
    vision_dim=32,
    num_patches=16,
    images=8,
    heads=8,
    layers=2,
    ffn_mult=4,
    repeats=3,
    warmup=2,
    queries=(4, 16),
)


class LoopBlock(nn.Module):
    """Seed block, corrected: pre-norm, residuals add the block's own input, MultiheadAttention per image."""

    def __init__(self, hidden: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_kv = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=True)
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden * ffn_mult), nn.GELU(), nn.Linear(hidden * ffn_mult, hidden))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        x = x + self.attn(self.norm_q(x), kv, kv, need_weights=False)[0]
        return x + self.ffn(self.norm_ffn(x))


class LoopProjector(nn.Module):
    """Same math as `SlotCrossAttentionProjector`, but the whole projector runs once per image in Python."""

    def __init__(self, vision_dim: int, hidden: int, num_patches: int, num_queries: int, s: Sizes) -> None:
        super().__init__()
        self.vision_adapter = nn.Linear(vision_dim, hidden)
        self.slot_embed = nn.Parameter(torch.empty(num_queries, hidden))
        self.register_buffer("key_pos", sincos_2d(num_patches, hidden), persistent=False)
        self.layers = nn.ModuleList(LoopBlock(hidden, s.heads, s.ffn_mult) for _ in range(s.layers))
        self.output_norm = nn.LayerNorm(hidden)
        init_weights(self)
        for layer in self.layers:
            trunc_normal(layer.attn.in_proj_weight)
            nn.init.zeros_(layer.attn.in_proj_bias)
        trunc_normal(self.slot_embed)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        outputs = []
        for image in range(features.shape[0]):
            kv = self.vision_adapter(features[image : image + 1]) + self.key_pos
            x = queries[image : image + 1] + self.slot_embed
            for layer in self.layers:
                x = layer(x, kv)
            outputs.append(self.output_norm(x))
        return torch.cat(outputs, dim=0)


@torch.no_grad()
def copy_weights(batched: nn.Module, loop: LoopProjector) -> None:
    """Give the loop the batched projector's weights, so the two can be checked to compute the same function."""
    loop.vision_adapter.load_state_dict(batched.vision_adapter.state_dict())
    loop.slot_embed.copy_(batched.slot_embed)
    loop.output_norm.load_state_dict(batched.output_norm.state_dict())
    for src, dst in zip(batched.layers, loop.layers, strict=True):
        for name in ("norm_q", "norm_kv", "norm_ffn", "ffn"):
            getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
        a = src.attn
        dst.attn.in_proj_weight.copy_(torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]))
        dst.attn.in_proj_bias.copy_(torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]))
        dst.attn.out_proj.load_state_dict(a.to_out.state_dict())


def trainable_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def make_cfg(kind: str, num_queries: int, s: Sizes, revision: int = 1) -> VLMConfig:
    return VLMConfig(
        projector=kind,
        projector_revision=revision,
        num_image_tokens=num_queries,
        projector_layers=s.layers,
        projector_heads=s.heads,
        projector_ffn_mult=s.ffn_mult,
        projector_dropout=0.0,
    )


def step(model: nn.Module, features: torch.Tensor, queries: torch.Tensor) -> None:
    """One training step's compute: forward, loss, backward (grads dropped so nothing accumulates)."""
    model.zero_grad(set_to_none=True)
    model(features, queries).square().mean().backward()


def peak_alloc_mb(model: nn.Module, features: torch.Tensor, queries: torch.Tensor) -> float:
    """Peak of live CPU tensor bytes allocated by one `step`, replayed from the profiler's allocation events.

    Every allocation and free the CPU allocator reports during the step is summed in time order; the
    maximum of that running sum is the peak extra memory the step needed on top of what already existed.
    """
    from torch._C._profiler import _EventType  # the same private API torch.profiler._memory_profiler uses

    model.zero_grad(set_to_none=True)  # free old grads first: frees of blocks older than the profile are unseen
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, features, queries)
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak / 2**20


def bench_pair(
    batched: nn.Module, loop: nn.Module, features: torch.Tensor, queries: torch.Tensor, s: Sizes
) -> dict[str, list[float]]:
    """Interleave A,B,A,B,... so slow drift (thermal, other load) hits both implementations alike."""
    models = {"batched": batched, "loop": loop}
    for _ in range(s.warmup):
        for model in models.values():
            step(model, features, queries)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(s.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            step(model, features, queries)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def param_table(s: Sizes) -> list[str]:
    lines = [
        f"Trainable projector parameters at hidden {s.hidden}, vision {s.vision_dim}, {s.num_patches} patches, "
        f"{s.layers} layers, {s.heads} heads, FFN x{s.ffn_mult}:"
    ]
    rows = [("cross_attention", n, 2) for n in (s.num_patches, s.num_patches // 4)]
    rows += [("cross_attention", n, 1) for n in sorted(set(s.queries) | {s.num_patches}, reverse=True)]
    rows += [("mlp", s.num_patches, 2), ("linear", s.num_patches, 2)]
    for kind, n, revision in rows:
        model = build_projector(make_cfg(kind, n, s, revision), s.vision_dim, s.hidden, s.num_patches)
        name = f"{kind} r{revision}" if kind == "cross_attention" else kind
        lines.append(f"  {name:<19} N={n:<4} {trainable_params(model):>12,}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 repetitions (CI smoke run)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)

    print(
        f"Projector fwd+bwd, fp32 CPU, {torch.get_num_threads()} threads, torch {torch.__version__}: "
        f"{s.images} images, hidden {s.hidden}, vision {s.vision_dim}, {s.num_patches} patches, {s.heads} heads, "
        f"{s.layers} layers, dropout 0; loss = out.square().mean()."
    )
    print(
        f"Timing: {s.warmup} warm-up steps, then median of {s.repeats} interleaved steps (batched, loop, ...); "
        "spread = min-max ms."
    )
    print(
        "Peak MB: max of the running sum of CPU allocations minus frees (torch.profiler profile_memory) "
        "during one fwd+bwd step, above memory live before it."
    )
    print("loop = seed design, corrected, whole projector run per image with nn.MultiheadAttention, then concatenated.")

    header = (
        f"{'config':<18} {'batched ms':>10} {'loop ms':>9} {'ratio':>6} {'min ratio':>9}  "
        f"{'spread ms batched | loop':<30} {'peak MB batched/loop':>20}"
    )
    rows: list[str] = []
    param_lines: list[str] = []
    for n in s.queries:
        features = torch.randn(s.images, s.num_patches, s.vision_dim)
        queries = torch.randn(s.images, n, s.hidden) * 0.02
        batched = build_projector(make_cfg("cross_attention", n, s), s.vision_dim, s.hidden, s.num_patches)
        loop = LoopProjector(s.vision_dim, s.hidden, s.num_patches, n, s)
        batched.train()
        loop.train()
        pb, pl = trainable_params(batched), trainable_params(loop)
        param_lines.append(f"  N={n}: batched {pb:,} params, loop {pl:,} params ({100 * (pl - pb) / pb:+.2f} %)")
        copy_weights(batched, loop)
        with torch.no_grad():
            diff = (batched(features, queries) - loop(features, queries)).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"loop and batched projectors disagree (max |diff| {diff:.2e}); the benchmark is void")
        param_lines[-1] += f", same weights -> max |out diff| {diff:.1e}"

        times = bench_pair(batched, loop, features, queries, s)
        mem_b = peak_alloc_mb(batched, features, queries)
        mem_l = peak_alloc_mb(loop, features, queries)
        med_b, med_l = statistics.median(times["batched"]), statistics.median(times["loop"])
        spread = (
            f"{min(times['batched']):.1f}-{max(times['batched']):.1f} | "
            f"{min(times['loop']):.1f}-{max(times['loop']):.1f}"
        )
        config = f"{s.images}x{n} q, {s.num_patches} kv"
        ratio, min_ratio = med_l / med_b, min(times["loop"]) / min(times["batched"])
        mem = f"{mem_b:.1f}/{mem_l:.1f}"
        rows.append(
            f"{config:<18} {med_b:>10.1f} {med_l:>9.1f} {ratio:>5.2f}x {min_ratio:>8.2f}x  {spread:<30} {mem:>20}"
        )

    print()
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    print(
        "(ratio = loop median / batched median, min ratio = loop min / batched min; > 1: batched is faster.\n"
        " A wide spread means the CPU was shared with other work: then trust min ratio more.)"
    )
    print(f"1-min load average: {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end (cores: {os.cpu_count()})")
    print()
    print("Parameter counts of the two benchmarked implementations:")
    print("\n".join(param_lines))
    print()
    print("\n".join(param_table(FULL)))


if __name__ == "__main__":
    main()
