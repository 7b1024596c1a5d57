"""Weight init shared by the projectors: truncated normal at 0.02, cut at 2 std."""

from __future__ import annotations

import torch
from torch import nn


def trunc_normal(t: torch.Tensor, std: float = 0.02) -> None:
    # torch's default cut is at +-2 absolute, i.e. no cut at std 0.02; cut at 2 std as intended.
    nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
