"""`load(dir)`: an adapter dir with its base, ready to generate."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .attach import attach
from .config import VLMConfig
from .processor import VLMProcessor


def load(
    directory: str | Path,
    *,
    base: str | None = None,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
) -> tuple[torch.nn.Module, VLMProcessor]:
    """Load an adapter dir onto the base it names (or `base`); returns (model, processor) in eval mode."""
    directory = Path(directory)
    cfg = VLMConfig.from_pretrained(directory)
    source = base or cfg.base_model
    if not source:
        raise ValueError(f"{directory}/vlm_config.json names no base model; pass base=<dir or hub id>.")
    llm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if device is not None:
        llm.to(device)
    model = attach(llm, directory)
    return model.eval(), VLMProcessor.from_pretrained(directory)
