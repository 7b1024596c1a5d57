"""`VLMConfig`: everything that turns a base causal LM into a VLM, saved as `vlm_config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "vlm_config.json"
FORMAT_VERSION = 1
PROJECTOR_KINDS = ("cross_attention", "mlp", "linear")
PROJECTOR_REVISIONS = (1, 2)


@dataclass
class VLMConfig:
    """What makes a base LLM a VLM.

    `vision_model` names the tower (hub id or local dir); `vision_config`, when set, builds one
    with random weights from an inline config dict instead (tests, demos, benchmarks). Fields
    marked *filled at attach* are read off the tower and the LLM, so a saved config fully
    describes the projector's shapes.
    """

    vision_model: str | None = "openai/clip-vit-base-patch16"
    vision_config: dict[str, Any] | None = None
    # Which hidden state of the tower feeds the projector (-1: last; LLaVA-1.5 uses -2).
    vision_feature_layer: int = -1

    projector: str = "cross_attention"
    num_image_tokens: int = 196
    projector_layers: int = 2
    projector_heads: int = 8
    projector_ffn_mult: int = 4
    projector_dropout: float = 0.1
    # Which cross-attention design (BENCHMARKS §9): 2 = an MLP per patch refined by gated
    # cross-attention, then a Linear per token over its patch or r x r group; 1 = learned slots
    # reading through attention only. A vlm_config.json without this key loads as 1.
    projector_revision: int = 2

    image_token: str = "<|image_pad|>"
    vision_start_token: str = "<|vision_start|>"
    vision_end_token: str = "<|vision_end|>"
    image_token_id: int = 151655

    # Filled at attach.
    vision_hidden_size: int | None = None
    num_patches: int | None = None
    text_hidden_size: int | None = None

    # Identity of the base LLM, written when an adapter dir is saved.
    base_model: str | None = None
    base_fingerprint: dict[str, Any] | None = None
    # SHA-256 of the tensor files saved beside this config, checked when they are read back.
    checksums: dict[str, str] = field(default_factory=dict)

    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(
                f"VLMConfig.projector={self.projector!r} is not a projector kind; use one of {PROJECTOR_KINDS}."
            )
        if self.vision_model is None and self.vision_config is None:
            raise ValueError(
                "VLMConfig needs a vision tower: set `vision_model` (hub id or local dir) or `vision_config`."
            )
        for name in (
            "num_image_tokens",
            "projector_layers",
            "projector_heads",
            "projector_ffn_mult",
            "projector_revision",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VLMConfig.{name} must be a positive integer, got {value!r}.")
        if self.projector_revision not in PROJECTOR_REVISIONS:
            raise ValueError(
                f"VLMConfig.projector_revision={self.projector_revision!r} is not known; "
                f"use one of {PROJECTOR_REVISIONS}."
            )
        if not 0.0 <= self.projector_dropout < 1.0:
            raise ValueError(f"VLMConfig.projector_dropout must be in [0, 1), got {self.projector_dropout!r}.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"vlm_config.json has format_version {self.format_version}, newer than this vlm-peft "
                f"understands ({FORMAT_VERSION}); upgrade vlm-peft."
            )

    @property
    def image_run_length(self) -> int:
        """Tokens one image occupies in the text: start + N pads + end."""
        return self.num_image_tokens + 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> VLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown VLMConfig keys {unknown}; allowed keys are {sorted(known)}.")
        return cls(**data)

    def save_pretrained(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VLMConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a vlm-peft adapter or merged dir.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if isinstance(data, dict):
            data.setdefault("projector_revision", 1)  # saved before revision 2 existed
        return cls.from_dict(data, source=str(path))
