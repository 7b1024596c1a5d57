"""The cross-attention projector: N image tokens per image that read all of that image's patches.

Revision 2 (the default; issue 14, BENCHMARKS §9). Each patch starts as LLaVA's MLP on that patch,
then pre-norm cross-attention blocks refine it over every patch of the image, each sub-layer behind a
tanh gate that starts at zero (Flamingo), training at a tenth of the projector's learning rate
(`lr.attention`; at the full rate they cost ~20 points on glyphs). A Linear then makes each token from
one patch's output (N = patches) or from an r x r group of patches' outputs laid side by side (N =
patches / r², pixel unshuffle), plus a learned per-token embedding. So the projector starts as an MLP
projector, which learns fast from questions alone, and the attention adds what it learns to add.
Revision 1 (learned slots reading through attention only, adapters saved before revision 2) stays
loadable; it trailed the MLP by 15-45 points on tasks it was not tuned on.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import VLMConfig
from .init import init_weights, trunc_normal

MAX_MERGE = 4  # patches per token side: at 4x4 the merge Linear already takes 16 hidden widths


def sincos_2d(num_patches: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions for a square patch grid (1D when the count is not square)."""
    side = math.isqrt(num_patches)

    def sincos_1d(pos: torch.Tensor, d: int) -> torch.Tensor:
        freqs = 1.0 / (10000 ** (torch.arange(d // 2, dtype=torch.float64) / max(d // 2, 1)))
        angles = pos.double()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    if side * side != num_patches or dim % 4:
        emb = sincos_1d(torch.arange(num_patches), dim - dim % 2)
    else:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        emb = torch.cat([sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


def merge_factor(num_patches: int, num_tokens: int) -> int:
    """r such that an r x r group of patches makes one token (0 when no such grid exists)."""
    side, out = math.isqrt(num_patches), math.isqrt(num_tokens)
    if num_tokens == num_patches:
        return 1
    if side * side == num_patches and out * out == num_tokens and side % out == 0:
        return side // out
    return 0


def merge_patches(features: torch.Tensor, num_tokens: int, r: int) -> torch.Tensor:
    """[images, patches, d] -> [images, num_tokens, d * r²]: each r x r cell's patches side by side,
    nothing averaged away (InternVL/Idefics3's pixel shuffle). Without such a grid (r = 0): the
    average of (overlapping) runs of patches, [images, num_tokens, d]."""
    images, patches, dim = features.shape
    if r == 1:
        return features
    if r == 0:
        return F.adaptive_avg_pool1d(features.transpose(1, 2), num_tokens).transpose(1, 2)
    out = math.isqrt(num_tokens)
    grid = features.reshape(images, out, r, out, r, dim).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(images, num_tokens, r * r * dim)


class CrossAttention(nn.Module):
    """Multi-head attention from the token queries to one image's patch tokens, via SDPA."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"projector hidden size {hidden} is not divisible by projector_heads={heads}.")
        self.heads = heads
        self.dropout = dropout
        # Names unlike the LLM's (q_proj, …) so LoRA target lists never match the projector.
        self.to_q = nn.Linear(hidden, hidden)
        self.to_k = nn.Linear(hidden, hidden)
        self.to_v = nn.Linear(hidden, hidden)
        self.to_out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        images, n, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(images, -1, self.heads, hidden // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.to_q(x)),
            split(self.to_k(kv)),
            split(self.to_v(kv)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.to_out(out.transpose(1, 2).reshape(images, n, hidden))


class CrossAttentionBlock(nn.Module):
    """Pre-norm block; each residual adds the block's own input (the seed added the original query).
    `gated`: each sub-layer's output is scaled by tanh of a learned scalar that starts at 0."""

    def __init__(self, hidden: int, heads: int, ffn_mult: int, dropout: float, gated: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_kv = nn.LayerNorm(hidden)
        self.attn = CrossAttention(hidden, heads, dropout)
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden * ffn_mult), nn.GELU(), nn.Linear(hidden * ffn_mult, hidden))
        self.drop = nn.Dropout(dropout)
        # Shape (1,), not (): FSDP2 cannot shard scalar parameters.
        self.gate_attn = nn.Parameter(torch.zeros(1)) if gated else None
        self.gate_ffn = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        attn = self.drop(self.attn(self.norm_q(x), self.norm_kv(kv)))
        x = x + (attn if self.gate_attn is None else self.gate_attn.tanh() * attn)
        ffn = self.drop(self.ffn(self.norm_ffn(x)))
        return x + (ffn if self.gate_ffn is None else self.gate_ffn.tanh() * ffn)


class CrossAttentionProjector(nn.Module):
    """Revision 2: an MLP per patch, refined by gated cross-attention over all patches, then a Linear
    per token over its patch or its r x r group of patches (off the grid: over an average of patches)."""

    def __init__(self, vision_dim: int, hidden: int, num_patches: int, cfg: VLMConfig) -> None:
        super().__init__()
        self.num_tokens = cfg.num_image_tokens
        if cfg.num_image_tokens > num_patches:
            raise ValueError(
                f"num_image_tokens={cfg.num_image_tokens} is more than the vision tower's {num_patches} patches; "
                "revision 2 of the cross-attention projector makes one token per patch or per group of patches "
                "(projector_revision=1, learned slots, takes any count)."
            )
        r = self.merge = merge_factor(num_patches, cfg.num_image_tokens)
        if r > MAX_MERGE:
            raise ValueError(
                f"num_image_tokens={cfg.num_image_tokens} makes each token of {r}x{r} patches: the projector's merge "
                f"layer would take {r * r * hidden:,} inputs. Use at least {num_patches // MAX_MERGE**2} tokens "
                f"(e.g. {num_patches // 4} for 2x2), or projector_revision=1 (learned slots, any count)."
            )
        if not r:
            # Still works (overlapping runs of patches averaged), but loses detail a grid merge keeps.
            warnings.warn(
                f"num_image_tokens={cfg.num_image_tokens} is not the tower's {num_patches} patches merged in square "
                f"groups (e.g. {num_patches // 4} for 2x2); each token is an average of patches' outputs.",
                stacklevel=3,
            )
        # Everything up to the merge works per patch, so a merged token keeps what the attention found
        # between its patches (counting at N/4: 62.6 vs 41.6 % merging first, BENCHMARKS §9).
        self.content = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # Learned embeddings per patch and per output token, so each query knows which patch it stands
        # for and the LLM which cell a token holds (a zero-initialised one: 44.7 vs 59.0 % on glyphs, §9).
        self.patch_embed = nn.Parameter(torch.empty(num_patches, hidden))
        self.slot_embed = nn.Parameter(torch.empty(cfg.num_image_tokens, hidden))
        self.key_proj = nn.Linear(vision_dim, hidden)
        self.register_buffer("key_pos", sincos_2d(num_patches, hidden), persistent=False)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(hidden, cfg.projector_heads, cfg.projector_ffn_mult, cfg.projector_dropout, gated=True)
            for _ in range(cfg.projector_layers)
        )
        # Each r x r group of patches' outputs side by side -> one token; at r = 1 too (glyphs 90.1 vs
        # 87.6 % without it, BENCHMARKS §9). Off the grid: over the average of a run of patches.
        self.merge_proj = nn.Linear(max(r, 1) ** 2 * hidden, hidden)
        init_weights(self)
        # Unit gain for the keys: patch content must not start far weaker than the fixed positions.
        trunc_normal(self.key_proj.weight, std=vision_dim**-0.5)
        trunc_normal(self.patch_embed)
        trunc_normal(self.slot_embed)
        if r > 1:
            # Unit gain where patches merge: at 0.02 over r*r*hidden inputs the image-dependent part of a
            # token starts ~3x below the text embeddings' scale, and a task with no single-image signal
            # (compare at N/4) found only warm-vs-cool (82.3 %); unit gain 89.2 %, BENCHMARKS §9.
            trunc_normal(self.merge_proj.weight, std=self.merge_proj.in_features**-0.5)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        # `queries` (the placeholder embeddings) are all one vector: they carry nothing to add.
        x = self.content(features) + self.patch_embed
        kv = self.key_proj(features) + self.key_pos.to(features.dtype)
        for layer in self.layers:
            x = layer(x, kv)
        return self.merge_proj(merge_patches(x, self.num_tokens, self.merge)) + self.slot_embed


class SlotCrossAttentionProjector(nn.Module):
    """Revision 1 (adapters saved before revision 2): N learned slots attend to all of the image's patches.

    Queries are the placeholder embeddings plus a learned per-slot embedding: the placeholder
    tokens are identical and Qwen3 has no absolute positions, so without the slot embedding
    every output token would be the same vector.
    """

    def __init__(self, vision_dim: int, hidden: int, num_patches: int, cfg: VLMConfig) -> None:
        super().__init__()
        self.vision_adapter = nn.Linear(vision_dim, hidden)
        self.slot_embed = nn.Parameter(torch.empty(cfg.num_image_tokens, hidden))
        self.register_buffer("key_pos", sincos_2d(num_patches, hidden), persistent=False)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(hidden, cfg.projector_heads, cfg.projector_ffn_mult, cfg.projector_dropout)
            for _ in range(cfg.projector_layers)
        )
        self.output_norm = nn.LayerNorm(hidden)
        init_weights(self)
        # Unit gain (std 1/sqrt(vision_dim) before the 2-std cut), not 0.02: patch content is added to
        # fixed positions of RMS ~0.7, and at 0.02 a narrow tower's content starts far weaker than them.
        trunc_normal(self.vision_adapter.weight, std=vision_dim**-0.5)
        trunc_normal(self.slot_embed)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        kv = self.vision_adapter(features) + self.key_pos.to(features.dtype)
        x = queries + self.slot_embed
        for layer in self.layers:
            x = layer(x, kv)
        return self.output_norm(x)

    @torch.no_grad()
    def match_output_scale(self, embedding_rms: float) -> None:
        """Start outputs at the RMS of the LLM's token embeddings, so image tokens enter the
        residual stream at the same scale as text tokens."""
        self.output_norm.weight.fill_(embedding_rms)
