"""The frozen vision tower: CLIP or SigLIP vision encoders from a dir, a hub id, or a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .config import VLMConfig


class VisionTower(nn.Module):
    """Wraps a vision encoder; always eval, never trained, returns patch tokens only.

    It is kept outside the LLM's module tree (see `attach`), so its weights are not part of
    the LLM's state dict and PEFT never injects LoRA into its Linear layers.
    """

    def __init__(self, model: PreTrainedModel, feature_layer: int = -1, source: str | None = None) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.train(False)
        self.feature_layer = feature_layer
        # Where it was loaded from; None means random weights that must be saved to be reloaded.
        self.source = source
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.num_patches: int = (cfg.image_size // cfg.patch_size) ** 2
        layers = cfg.num_hidden_layers
        if not -layers - 1 <= feature_layer <= layers:
            raise ValueError(f"vision_feature_layer={feature_layer} is out of range for a tower with {layers} layers.")

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, H, W] -> [images, patches, hidden]; CLIP's CLS token is dropped."""
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be [images, channels, height, width], got shape {tuple(pixel_values.shape)}."
            )
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        want_hidden = self.feature_layer != -1
        out = self.model(pixel_values=pixel_values, output_hidden_states=want_hidden)
        feats = out.hidden_states[self.feature_layer] if want_hidden else out.last_hidden_state
        if feats.shape[1] == self.num_patches + 1:
            feats = feats[:, 1:]
        if feats.shape[1] != self.num_patches:
            raise ValueError(
                f"vision tower returned {feats.shape[1]} tokens for images of {tuple(pixel_values.shape[-2:])} px; "
                f"expected {self.num_patches}. Resize images to {self.model.config.image_size} px "
                "(the processor does this)."
            )
        return feats


def _vision_part(config: PretrainedConfig) -> PretrainedConfig:
    # A full CLIP/SigLIP checkpoint holds a text tower too; keep only the vision side.
    return getattr(config, "vision_config", None) or config


def build_vision_model(config: dict[str, Any] | PretrainedConfig) -> PreTrainedModel:
    """A vision encoder with random weights, e.g. `{"model_type": "clip_vision_model", ...}`."""
    if isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type", "clip_vision_model")
        try:
            config = AutoConfig.for_model(model_type, **config)
        except ValueError as err:
            raise ValueError(
                f"vision_config.model_type={model_type!r} is not a known config type "
                "(use 'clip_vision_model' or 'siglip_vision_model')."
            ) from err
    return AutoModel.from_config(_vision_part(config))


def vision_config_dict(config: PretrainedConfig) -> dict[str, Any]:
    """A tower's config as `VLMConfig.vision_config` holds it."""
    return {**config.to_dict(), "model_type": config.model_type}


def load_vision_tower(cfg: VLMConfig, base_dir: str | Path | None = None) -> VisionTower:
    """Build the tower a config names. `./sub` paths are relative to `base_dir` (an adapter dir)."""
    if cfg.vision_config is not None:  # an explicit config wins over the default hub id
        return VisionTower(build_vision_model(cfg.vision_config), cfg.vision_feature_layer, source=None)
    source = cfg.vision_model
    if source.startswith("./") and base_dir is not None:
        source = str(Path(base_dir) / source[2:])
    model = AutoModel.from_pretrained(source, config=_vision_part(AutoConfig.from_pretrained(source)))
    return VisionTower(model, cfg.vision_feature_layer, source=cfg.vision_model)
