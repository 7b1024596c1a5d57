"""`load(dir)`: a merged dir, or an adapter dir with its base, ready to generate."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..data.processor import VLMProcessor
from ..model.attach import attach
from ..model.config import CONFIG_NAME, VLMConfig


def is_merged(directory: str | Path) -> bool:
    """A merged dir holds the LLM itself (config.json) next to vlm_config.json."""
    directory = Path(directory)
    return (directory / CONFIG_NAME).is_file() and (directory / "config.json").is_file()


def load(
    directory: str | Path,
    *,
    base: str | None = None,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
) -> tuple[torch.nn.Module, VLMProcessor]:
    """(model, processor) in eval mode from a merged dir, or from an adapter dir on the base it
    names (or `base`)."""
    directory = Path(directory)
    cfg = VLMConfig.from_pretrained(directory)
    source = base or (str(directory) if is_merged(directory) else cfg.base_model)
    if not source:
        raise ValueError(f"{directory}/vlm_config.json names no base model; pass base=<dir or hub id>.")
    llm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if device is not None:
        llm.to(device)
    return attach(llm, directory).eval(), VLMProcessor.from_pretrained(directory)
