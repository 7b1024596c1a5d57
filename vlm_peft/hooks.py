"""The forward pre-hook and generate wrapper that splice images into an unmodified LLM.

Follow `pixel_values`: `model(..., pixel_values=…)` -> `_splice_images` pops them, encodes
them with the frozen tower, runs the projector on the placeholder embeddings and hands the
decoder `inputs_embeds` instead of `input_ids`. `generate` encodes once up front and leaves
the features pending for the forward calls that carry placeholders (prefill with a cache,
every step without one).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import VLMConfig
from .splice import check_image_count, image_runs, placeholder_queries, scatter_image_embeds
from .vision import VisionTower

PROJECTOR_ATTR = "vlm_projector"
STATE_ATTR = "_vlm_state"
IMAGE_KWARGS = ("pixel_values", "image_features")


@dataclass
class PendingImages:
    """Image features handed from `generate` to the forward calls it makes."""

    features: torch.Tensor
    counts: list[int]

    def for_rows(self, counts: list[int]) -> torch.Tensor:
        # Beam search / num_return_sequences repeat each row k times in place (repeat_interleave);
        # a sample's images must follow its rows, not be repeated image by image.
        rows, k = len(counts), len(counts) // len(self.counts)
        if k * len(self.counts) != rows or counts != [c for c in self.counts for _ in range(k)]:
            raise ValueError(
                f"generate was given images for placeholder runs {self.counts}, but a forward call "
                f"holds runs {counts}; input_ids changed shape in a way vlm-peft cannot follow."
            )
        offsets = [0]
        for c in self.counts:
            offsets.append(offsets[-1] + c)
        index = [offsets[r // k] + j for r in range(rows) for j in range(counts[r])]
        return self.features[torch.tensor(index, device=self.features.device)]


@dataclass
class VLMState:
    """What `attach` hangs on the LLM outside its module tree (the tower stays out of state_dict)."""

    config: VLMConfig
    vision: VisionTower
    handles: list[Any] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    pending: PendingImages | None = None


def get_state(llm: nn.Module) -> VLMState:
    state = getattr(llm, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(llm).__name__} has no vision attached; call vlm_peft.attach(llm, config) first.")
    return state


def encode_images(
    llm: nn.Module, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None
) -> torch.Tensor:
    """Patch features from images (frozen tower) or from precomputed tower outputs."""
    state = get_state(llm)
    projector_param = next(getattr(llm, PROJECTOR_ATTR).parameters())
    if image_features is None:
        if state.vision.device != projector_param.device:
            state.vision.to(projector_param.device)
        image_features = state.vision(pixel_values)
    cfg = state.config
    expected = (cfg.num_patches, cfg.vision_hidden_size)
    if image_features.dim() != 3 or tuple(image_features.shape[1:]) != expected:
        raise ValueError(
            f"image_features must be [images, {expected[0]}, {expected[1]}] (this vision tower's patches x "
            f"width), got {tuple(image_features.shape)}."
        )
    return image_features.to(device=projector_param.device, dtype=projector_param.dtype)


def _positional_to_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    if args:
        names = list(inspect.signature(type(module).forward).parameters)[1:]
        kwargs.update(zip(names, args))
    return kwargs


def _splice_images(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state = get_state(module)
    cfg = state.config
    kwargs = _positional_to_kwargs(module, args, kwargs)
    pixel_values = kwargs.pop("pixel_values", None)
    image_features = kwargs.pop("image_features", None)
    given = pixel_values if image_features is None else image_features
    num_given = 0 if given is None else given.shape[0]
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        if num_given:
            raise ValueError("images were passed with inputs_embeds; pass input_ids holding the image placeholders.")
        return (), kwargs
    counts = image_runs(input_ids, cfg.image_token_id, cfg.num_image_tokens, cfg.image_token)
    if sum(counts) == 0 and num_given == 0:
        return (), kwargs
    if num_given:
        check_image_count(counts, num_given)
        features = encode_images(module, pixel_values, image_features)
    elif state.pending is not None:
        features = state.pending.for_rows(counts)
    else:
        check_image_count(counts, 0)
    embeds = module.get_input_embeddings()(input_ids)
    queries = placeholder_queries(embeds, input_ids, cfg.image_token_id, cfg.num_image_tokens)
    image_embeds = getattr(module, PROJECTOR_ATTR)(features, queries.to(features.dtype))
    kwargs["inputs_embeds"] = scatter_image_embeds(embeds, input_ids, cfg.image_token_id, image_embeds)
    kwargs["input_ids"] = None
    return (), kwargs


def _generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state = get_state(self)
    cfg = state.config
    # Placeholders are input-only: a generated one would start a run no image can fill.
    generation_config = kwargs.get("generation_config") or self.generation_config
    suppress = kwargs.pop("suppress_tokens", None) or generation_config.suppress_tokens or []
    kwargs["suppress_tokens"] = sorted(set(suppress) | {cfg.image_token_id})
    pixel_values = kwargs.pop("pixel_values", None)
    image_features = kwargs.pop("image_features", None)
    given = pixel_values if image_features is None else image_features
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if given is None or (given.shape[0] == 0 and input_ids is not None):
        return type(self).generate(self, *args, **kwargs)
    if input_ids is None:
        raise ValueError("generate with images needs input_ids holding the image placeholders.")
    counts = image_runs(input_ids, cfg.image_token_id, cfg.num_image_tokens, cfg.image_token)
    check_image_count(counts, given.shape[0])
    state.pending = PendingImages(encode_images(self, pixel_values, image_features), counts)
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        state.pending = None


def install(llm: nn.Module, state: VLMState) -> None:
    object.__setattr__(llm, STATE_ATTR, state)
    state.handles.append(llm.register_forward_pre_hook(_splice_images, with_kwargs=True))
    llm.generate = _generate.__get__(llm)


def uninstall(llm: nn.Module) -> VLMState:
    state = get_state(llm)
    for handle in state.handles:
        handle.remove()
    llm.__dict__.pop("generate", None)
    object.__delattr__(llm, STATE_ATTR)
    return state
