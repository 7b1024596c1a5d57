"""What is checked before anything is built: every path the recipe names, and sizes that only the
model's config can tell. A bad recipe fails in seconds, with the key to fix."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from transformers import AutoConfig

from .recipe import Recipe, RecipeError, StageSpec


def check_paths(recipe: Recipe, stages: list[StageSpec], features: bool = True) -> None:
    """Every path the run reads, checked before any model is built: a recipe error naming the key."""
    models = {
        "llm.name_or_path": recipe.llm.name_or_path,
        "llm.tokenizer": recipe.llm.tokenizer,
        "vision.name_or_path": recipe.vision.name_or_path,
        "vision.image_processor": recipe.vision.image_processor,
    }
    for key, value in models.items():
        if value is None or Path(value).exists():
            continue
        if not is_hub_id(value):
            raise RecipeError(f"{key}: {value} does not exist (and is not a hub id like Qwen/Qwen3-0.6B).")
        if huggingface_hub.constants.HF_HUB_OFFLINE and not _in_hub_cache(value):
            raise RecipeError(
                f"{key}: {value} is not a local path, and the hub is offline (HF_HUB_OFFLINE) with no cached copy."
            )
    for spec in stages:
        where = f"stages.{spec.name}.data"
        for split in ("train", "eval"):
            path = getattr(spec.data, split)
            if path is not None and not Path(path).exists():
                raise RecipeError(f"{where}.{split}: {path} not found.")
        if spec.data.image_root is not None and not Path(spec.data.image_root).is_dir():
            raise RecipeError(f"{where}.image_root: {spec.data.image_root} is not a folder.")
        if features and spec.data.features is not None and not Path(spec.data.features).is_dir():
            raise RecipeError(
                f"{where}.features: {spec.data.features} does not exist; build it with "
                f"`vlm-peft data cache-features RECIPE --stage {spec.name}`, or remove the key to encode images."
            )


def is_hub_id(value: str) -> bool:
    """A repo id as the hub validates them (`name` or `org/name`); anything else is meant as a path."""
    if value.startswith((".", "/", "~")):
        return False
    try:
        huggingface_hub.utils.validate_repo_id(value)
    except huggingface_hub.utils.HFValidationError:
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, name), str):
            return True
    return False


def check_projector_width(recipe: Recipe) -> None:
    """The cross-attention projector works at the LLM's width: its heads must divide it. Read from the
    config alone (no weights), so a bad value fails before anything is built."""
    heads = recipe.projector.heads
    if recipe.projector.kind != "cross_attention":
        return
    if recipe.llm.random is not None:
        spec = dict(recipe.llm.random)
        hidden = AutoConfig.for_model(spec.pop("model_type", "qwen3"), **spec).hidden_size
    else:
        hidden = AutoConfig.from_pretrained(recipe.llm.name_or_path).hidden_size
    if hidden % heads:
        fits = [h for h in range(1, min(hidden, 64) + 1) if hidden % h == 0]
        raise RecipeError(
            f"projector.heads: {heads} does not divide the LLM's hidden size {hidden}, the projector's width; "
            f"use one of {fits}."
        )
