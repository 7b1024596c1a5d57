"""The forward pre-hook and generate wrapper that splice images into an unmodified LLM.

Follow `pixel_values`: `model(..., pixel_values=…)` -> `_splice_images` pops them, encodes
them with the frozen tower (`encode_images`), runs the projector on the placeholder embeddings
and hands the decoder `inputs_embeds` instead of `input_ids` (`embed_with_images`).
`generate(..., pixel_values=…)` does the same once, up front (`_generate`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import VLMConfig
from .engines import gathers_per_call
from .packed import PACKED_MARKER, prepare_packed_forward
from .splice import check_image_count, image_runs
from .vision import VisionTower

PROJECTOR_ATTR = "vlm_projector"
STATE_ATTR = "_vlm_state"
IMAGE_KWARGS = ("pixel_values", "image_features")


@dataclass
class VLMState:
    """What `attach` hangs on the LLM outside its module tree (the tower stays out of state_dict)."""

    config: VLMConfig
    vision: VisionTower
    handles: list[Any] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    had_input_grad_hook: bool = False


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


def embed_with_images(llm: nn.Module, input_ids: torch.Tensor, features: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Token embeddings with the projected images written into the placeholder runs at or after
    position `start` (earlier ones are already in a KV cache)."""
    cfg = get_state(llm).config
    embeds = llm.get_input_embeddings()(input_ids)
    mask = input_ids == cfg.image_token_id
    if start:
        mask[:, :start] = False
    queries = embeds[mask].view(-1, cfg.num_image_tokens, embeds.shape[-1])
    image_embeds = getattr(llm, PROJECTOR_ATTR)(features, queries.to(features.dtype))
    return embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.to(embeds.dtype))


def _count_images(llm: nn.Module, input_ids: torch.Tensor, images: torch.Tensor | None) -> int:
    """Validate placeholder runs against the images given; returns the number of images."""
    cfg = get_state(llm).config
    counts = image_runs(input_ids, cfg.image_token_id, cfg.num_image_tokens, cfg.image_token)
    num_images = 0 if images is None else images.shape[0]
    check_image_count(counts, num_images)
    return num_images


def _splice_images(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = _positional_to_kwargs(module, args, kwargs)
    prepare_packed_forward(module, kwargs)
    pixel_values = kwargs.pop("pixel_values", None)
    image_features = kwargs.pop("image_features", None)
    images = pixel_values if image_features is None else image_features
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        if images is not None and images.shape[0]:
            raise ValueError("images were passed with inputs_embeds; pass input_ids holding the image placeholders.")
        return (), kwargs
    if _count_images(module, input_ids, images):
        features = encode_images(module, pixel_values, image_features)
        kwargs["inputs_embeds"] = embed_with_images(module, input_ids, features)
        kwargs["input_ids"] = None
    elif (module.training and torch.is_grad_enabled()) or gathers_per_call(getattr(module, PROJECTOR_ATTR)):
        kwargs["inputs_embeds"] = embed_with_idle_projector(module, input_ids)
        kwargs["input_ids"] = None
    return (), kwargs


def embed_with_idle_projector(llm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings of a batch without images, plus 0 x the projector's output on one all-zero
    image: every rank then runs the same modules, in the same order, with the same collectives whatever
    its batch holds (DDP needs no find_unused_parameters, FSDP / ZeRO-3 gathers never wait on a rank that
    skipped the projector), and a frozen LLM's loss keeps a graph to backpropagate through. Used in
    training, and in evaluation too when the projector's weights are gathered at each call."""
    cfg = get_state(llm).config
    projector = getattr(llm, PROJECTOR_ATTR)
    weight = next(projector.parameters())
    # One embedding call for the text and the idle image's queries, as with images: ZeRO-3 gathers a
    # module's weights at each call, and a second call here would be a gather the other ranks never make.
    placeholders = torch.full((1, cfg.num_image_tokens), cfg.image_token_id, device=input_ids.device)
    embedded = llm.get_input_embeddings()(torch.cat([input_ids.flatten(), placeholders.flatten()]))
    embeds = embedded[: input_ids.numel()].view(*input_ids.shape, -1)
    query = embedded[input_ids.numel() :].unsqueeze(0)
    features = torch.zeros(1, cfg.num_patches, cfg.vision_hidden_size, device=weight.device, dtype=weight.dtype)
    idle = projector(features, query.to(weight.dtype))
    return embeds + (idle * 0.0).sum().to(embeds.dtype)  # zeroed before the sum: a large sum overflows fp16


def _generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Splice the images once, then let transformers generate from `input_ids` + `inputs_embeds`:
    it expands rows for beams / num_return_sequences itself and feeds the embeddings at prefill
    only, so the images are encoded once however generation proceeds."""
    cfg = get_state(self).config
    if PACKED_MARKER in kwargs:
        raise ValueError("generate takes one prompt per row; packed batches are for training and loss evaluation.")
    # Placeholders are input-only: a generated one would start a run no image can fill.
    generation_config = kwargs.get("generation_config") or self.generation_config
    suppress = kwargs.pop("suppress_tokens", None) or generation_config.suppress_tokens or []
    kwargs["suppress_tokens"] = sorted(set(suppress) | {cfg.image_token_id})
    pixel_values = kwargs.pop("pixel_values", None)
    image_features = kwargs.pop("image_features", None)
    images = pixel_values if image_features is None else image_features
    if args:
        kwargs["inputs"], args = args[0], args[1:]
    input_ids = kwargs.pop("input_ids", kwargs.pop("inputs", None))
    if input_ids is None:
        if images is not None and images.shape[0]:
            raise ValueError("generate with images needs input_ids holding the image placeholders.")
        return type(self).generate(self, *args, **kwargs)
    # Runs already in a passed KV cache (a continued chat) need no image: only the new part does.
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    start = cache.get_seq_length() if cache is not None else 0
    if "inputs_embeds" in kwargs:
        _count_images(self, input_ids[:, start:], images)  # still refuses images that do not fit the runs
    elif _count_images(self, input_ids[:, start:], images):
        if kwargs.get("prefill_chunk_size") or generation_config.prefill_chunk_size:
            raise ValueError("prefill_chunk_size cannot split images across chunks; unset it for image prompts.")
        if kwargs.get("assistant_model") is not None:
            raise ValueError("assisted generation with images is not supported; drop assistant_model.")
        with torch.no_grad():
            features = encode_images(self, pixel_values, image_features)
            kwargs["inputs_embeds"] = embed_with_images(self, input_ids, features, start=start)
    elif gathers_per_call(getattr(self, PROJECTOR_ATTR)):
        with torch.no_grad():  # the processes prompting with images gather the projector's weights: join them
            kwargs["inputs_embeds"] = embed_with_idle_projector(self, input_ids)
    return type(self).generate(self, *args, input_ids=input_ids, **kwargs)


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
