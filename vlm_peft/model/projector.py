"""Projectors: vision patch features -> LLM embeddings for the image placeholder slots.

All projectors share one call signature, `projector(features, queries)`, with
`features` [images, patches, vision_dim] and `queries` [images, N, hidden] (the LLM's
placeholder embeddings), and return [images, N, hidden]. Every image of the batch is
handled by one batched call; nothing loops over samples or images.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VLMConfig
from .cross_attention import CrossAttentionProjector, SlotCrossAttentionProjector, sincos_2d
from .init import init_weights, trunc_normal

__all__ = [
    "CrossAttentionProjector",
    "LinearProjector",
    "MLPProjector",
    "SlotCrossAttentionProjector",
    "build_projector",
    "init_weights",
    "sincos_2d",
    "trunc_normal",
]


class MLPProjector(nn.Module):
    """LLaVA-1.5: Linear-GELU-Linear per patch; one output token per patch."""

    def __init__(self, vision_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(vision_dim, hidden)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(hidden, hidden)
        init_weights(self)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(features)))


class LinearProjector(nn.Module):
    """MiniMind-V: one Linear per patch; one output token per patch."""

    def __init__(self, vision_dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, hidden)
        init_weights(self)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


def build_projector(cfg: VLMConfig, vision_dim: int, hidden: int, num_patches: int) -> nn.Module:
    if cfg.projector == "cross_attention":
        if cfg.projector_revision == 1:
            return SlotCrossAttentionProjector(vision_dim, hidden, num_patches, cfg)
        return CrossAttentionProjector(vision_dim, hidden, num_patches, cfg)
    if cfg.num_image_tokens != num_patches:
        raise ValueError(
            f"projector={cfg.projector!r} emits one token per patch, so num_image_tokens must equal the "
            f"vision tower's {num_patches} patches (got {cfg.num_image_tokens}); set num_image_tokens="
            f"{num_patches} or use projector='cross_attention' for a different count."
        )
    if cfg.projector == "mlp":
        return MLPProjector(vision_dim, hidden)
    return LinearProjector(vision_dim, hidden)
