"""vlm-peft: a frozen vision tower and a trainable projector on an unmodified Qwen3, by hooks."""

from .attach import attach, detach, vlm_config
from .checkpoint import save_adapter
from .config import VLMConfig
from .loading import load
from .lora import add_lora, lora_config
from .merge import merge
from .processor import VLMProcessor
from .vision import VisionTower

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
