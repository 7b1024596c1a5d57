"""Adapters that let other tools drive vlm-peft models (lmms-eval).

`lmms_eval.py` imports lmms-eval at module level, so `vlm_peft` never imports it; lmms-eval finds it
through its plugin entry point (pyproject.toml). `generation.py` needs no tool.
"""

from __future__ import annotations

from typing import Any


def lmms_eval_manifest() -> Any:
    """The `lmms_eval.models` entry point: lmms-eval calls it while it builds its model registry.

    It lives here, not in `integrations.lmms_eval`, because lmms-eval builds that registry while its
    own `lmms_eval.models` is half imported, and `integrations.lmms_eval` imports lmms-eval: if a user
    imported that module first, the entry point would find it half imported and lmms-eval would drop
    the model with a warning. Nothing but the class paths is needed to register.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    module = "vlm_peft.integrations.lmms_eval"
    return ModelManifest(
        model_id="vlm_peft",
        chat_class_path=f"{module}.VLMPeft",
        simple_class_path=f"{module}.VLMPeftSimple",
    )
