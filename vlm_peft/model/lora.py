"""LoRA on the LLM's decoder projections, with the projector kept trainable and saved."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .hooks import PROJECTOR_ATTR, get_state

# Full-match regex over module names: the decoder's attention and MLP projections only.
DECODER_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT's wrapping of a model: PEFT 0.21 reads `model.is_gradient_checkpointing`, a
    property transformers 5 deprecated, so every wrap would print a FutureWarning that no argument
    avoids. Only that message is silenced, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str | list[str] | None = None,
    **kwargs: Any,
) -> LoraConfig:
    """A LoraConfig for an attached model: decoder targets by default, projector in modules_to_save."""
    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    if PROJECTOR_ATTR not in modules_to_save:
        modules_to_save.append(PROJECTOR_ATTR)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules or DECODER_TARGETS,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def add_lora(model: nn.Module, config: LoraConfig | None = None, **kwargs: Any) -> PeftModel:
    """`get_peft_model` for an attached model, refusing configs that would freeze the projector."""
    if isinstance(model, PeftModel):
        raise ValueError("model already has PEFT adapters; add_lora takes the attached bare model.")
    get_state(model)
    config = config or lora_config(**kwargs)
    if PROJECTOR_ATTR not in (config.modules_to_save or []):
        raise ValueError(
            f"LoraConfig.modules_to_save must include {PROJECTOR_ATTR!r}, or PEFT freezes the projector and "
            "leaves it out of the saved adapter; build the config with vlm_peft.lora_config(...)."
        )
    # PEFT never injects adapters into modules_to_save, so even "all-linear" leaves the projector
    # whole; the vision tower is outside the module tree and out of reach too.
    with peft_wrapping():
        return get_peft_model(model, config)
