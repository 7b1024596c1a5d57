"""Harness-style generation settings (lm-eval / lmms-eval `generation_kwargs`) for transformers' `generate`:
sampling options and `until` stop strings, which end generation early and are cut off the answer."""

from __future__ import annotations

import logging
from typing import Any

from ..serving.generation import StopStrings

logger = logging.getLogger(__name__)

__all__ = ["GENERATION_KEYS", "StopStrings", "cut_at_stops", "generation_kwargs"]

GENERATION_KEYS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams"}


def generation_kwargs(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> tuple[list[str], dict[str, Any]]:
    """(stop strings, `generate` kwargs) from a task's generation_kwargs.

    temperature 0 means greedy whatever do_sample says (tasks write both); do_sample alone samples at
    temperature 1. Sampling uses exactly the task's top_p / top_k (none: off), not the ones a model's
    generation_config.json may carry (Qwen3's: 0.95 / 20)."""
    ignored = sorted(set(gen_kwargs) - GENERATION_KEYS)
    if ignored:
        logger.debug("generation_kwargs %s are not used by vlm_peft", ignored)
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"generation_kwargs until={until!r}: give a string or a list of strings.")
    temperature = gen_kwargs.get("temperature")
    do_sample = gen_kwargs.get("do_sample")
    if do_sample is None:
        do_sample = temperature is not None and float(temperature) > 0
    if temperature is not None and float(temperature) <= 0:
        do_sample = False
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        "do_sample": bool(do_sample),
        "num_beams": int(gen_kwargs.get("num_beams") or 1),
    }
    if do_sample:
        kwargs["temperature"] = 1.0 if temperature is None else float(temperature)
        kwargs["top_p"] = float(gen_kwargs.get("top_p") or 1.0)
        kwargs["top_k"] = int(gen_kwargs.get("top_k") or 0)
    return [s for s in until if s], kwargs


def cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the first stop string (lm-eval's semantics)."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text
