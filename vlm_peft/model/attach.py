"""`attach` / `detach`: make an unmodified causal LM a VLM in memory, and undo it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from .checkpoint import (
    PROJECTOR_FILE,
    active_projector,
    check_base,
    load_projector,
    projector_matches_file,
    unwrap,
    verify_dir,
)
from .config import VLMConfig
from .engines import gathered
from .hooks import PROJECTOR_ATTR, STATE_ATTR, VLMState, get_state, install, uninstall
from .lora import peft_wrapping
from .projector import build_projector
from .vision import VisionTower, load_vision_tower, vision_config_dict

ADAPTER_CONFIG = "adapter_config.json"


def _as_tower(
    vision: VisionTower | PreTrainedModel | None, cfg: VLMConfig, base_dir: Path | None
) -> tuple[VisionTower, VLMConfig]:
    """The tower to use, and the config rewritten to describe *that* tower, so a saved adapter
    reloads with it rather than with whatever the config named before."""
    if vision is None:
        return load_vision_tower(cfg, base_dir), cfg
    if not isinstance(vision, VisionTower):
        vision = VisionTower(vision, cfg.vision_feature_layer, getattr(vision.config, "_name_or_path", None) or None)
    if vision.feature_layer != cfg.vision_feature_layer:
        raise ValueError(
            f"the VisionTower given uses feature layer {vision.feature_layer} but the config says "
            f"vision_feature_layer={cfg.vision_feature_layer}; make them agree."
        )
    if vision.source:
        return vision, dataclasses.replace(cfg, vision_model=vision.source, vision_config=None)
    # Random weights with no source: save_adapter writes them to the adapter dir.
    return vision, dataclasses.replace(cfg, vision_model=None, vision_config=vision_config_dict(vision.model.config))


def _fill_sizes(cfg: VLMConfig, tower: VisionTower, llm: nn.Module, source: str) -> VLMConfig:
    sizes = {
        "vision_hidden_size": tower.hidden_size,
        "num_patches": tower.num_patches,
        "text_hidden_size": llm.get_input_embeddings().embedding_dim,
    }
    for key, value in sizes.items():
        saved = getattr(cfg, key)
        if saved is not None and saved != value:
            raise ValueError(f"{source}: {key} is {saved} in vlm_config.json but the models give {value}.")
    return dataclasses.replace(cfg, **sizes)


def attach(
    llm: PreTrainedModel,
    config_or_dir: VLMConfig | str | Path,
    vision: VisionTower | PreTrainedModel | None = None,
    *,
    is_trainable: bool = False,
) -> nn.Module:
    """Install the vision tower and projector on `llm` (in place) with hooks.

    `config_or_dir` is a `VLMConfig` (new projector, trainable) or an adapter dir, whose
    projector weights, and LoRA adapter when present, are restored; `is_trainable` keeps them
    trainable. The LLM's own weights are frozen. Returns the model to use: `llm`, or a
    `PeftModel` around it when the dir holds LoRA.
    """
    if isinstance(llm, PeftModel):
        raise ValueError("attach takes the bare transformers model; add LoRA afterwards with vlm_peft.add_lora.")
    if hasattr(llm, STATE_ATTR):
        raise ValueError("this model already has vision attached; call vlm_peft.detach(model) first.")
    directory = None if isinstance(config_or_dir, VLMConfig) else Path(config_or_dir)
    if directory is None:
        cfg = config_or_dir
    else:
        cfg = VLMConfig.from_pretrained(directory)
        verify_dir(directory, cfg)
        check_base(cfg, llm.config, str(directory))
    source = str(directory or "VLMConfig")
    tower, cfg = _as_tower(vision, cfg, directory)
    cfg = _fill_sizes(cfg, tower, llm, source)
    embeddings = llm.get_input_embeddings()
    if cfg.image_token_id >= embeddings.num_embeddings:
        raise ValueError(
            f"image_token_id {cfg.image_token_id} is outside the LLM's {embeddings.num_embeddings} embeddings; "
            "after adding the image tokens to the tokenizer, call llm.resize_token_embeddings(len(tokenizer))."
        )

    projector = build_projector(cfg, tower.hidden_size, cfg.text_hidden_size, tower.num_patches)
    # fp32 like PEFT's adapters: trainable weights in bf16 lose small updates.
    projector.to(device=embeddings.weight.device, dtype=torch.float32)
    if directory is not None:
        load_projector(projector, directory / PROJECTOR_FILE)
    elif hasattr(projector, "match_output_scale"):  # revision-1 cross-attention
        # Under ZeRO-3 the embedding loaded partitioned: its RMS is read whole (every process attaches).
        with gathered([embeddings.weight]) as (weight,):
            projector.match_output_scale(weight.float().pow(2).mean().sqrt().item())

    state = VLMState(config=cfg, vision=tower, had_input_grad_hook=hasattr(llm, "_require_grads_hook"))
    state.requires_grad = {name: p.requires_grad for name, p in llm.named_parameters()}
    llm.requires_grad_(False)
    projector.requires_grad_(directory is None or is_trainable)
    llm.add_module(PROJECTOR_ATTR, projector)
    install(llm, state)

    if directory is None or not (directory / ADAPTER_CONFIG).is_file():
        return llm
    model: nn.Module = llm
    try:
        with peft_wrapping():
            model = PeftModel.from_pretrained(llm, directory, is_trainable=is_trainable)
        if not projector_matches_file(active_projector(llm), directory / PROJECTOR_FILE):
            raise ValueError(
                f"{directory}: the projector PEFT restored from adapter_model.safetensors differs from "
                f"{PROJECTOR_FILE}; the adapter dir is inconsistent (re-save it with vlm_peft.save_adapter)."
            )
    except Exception:
        detach(model)  # leave the LLM as it was given
        raise
    return model


def detach(model: nn.Module) -> PreTrainedModel:
    """Remove hooks, projector, tower and any LoRA (unmerged): the LLM is as before `attach`."""
    if isinstance(model, PeftModel):
        model = model.unload()
    llm = unwrap(model)
    state = uninstall(llm)
    if hasattr(llm, "_require_grads_hook") and not state.had_input_grad_hook:
        llm.disable_input_require_grads()  # PEFT/TRL add it for gradient checkpointing
    projector = getattr(llm, PROJECTOR_ATTR)
    del llm._modules[PROJECTOR_ATTR]
    del projector
    for name, param in llm.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
    return llm


def vlm_config(model: nn.Module) -> VLMConfig:
    """The resolved config of an attached model."""
    return get_state(unwrap(model)).config
