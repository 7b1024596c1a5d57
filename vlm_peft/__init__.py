"""vlm-peft: a frozen vision tower and a trainable projector on an unmodified Qwen3, by hooks."""

from .data.processor import VLMProcessor
from .model.attach import attach, detach, vlm_config
from .model.checkpoint import save_adapter
from .model.config import VLMConfig
from .model.lora import add_lora, lora_config
from .model.vision import VisionTower
from .serving.loading import load
from .serving.merge import merge

__version__ = "0.1.0"

__all__ = [
    "VLMConfig",
    "VLMProcessor",
    "VisionTower",
    "add_lora",
    "attach",
    "detach",
    "load",
    "lora_config",
    "merge",
    "save_adapter",
    "vlm_config",
]
