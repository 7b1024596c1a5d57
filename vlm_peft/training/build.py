"""What a stage runs on: the tokenizer, the base LLM and vision tower (a `random` one built once per
output_dir, seeded, and reused only when built from the same config), the processor and the attached
model with the stage's LoRA and trainable parameters."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from ..atomic import remove, stale_temporaries
from ..data.processor import VLMProcessor
from ..model.attach import attach
from ..model.checkpoint import param_role, unwrap
from ..model.config import VLMConfig
from ..model.engines import numel
from ..model.hooks import get_state
from ..model.lora import add_lora, lora_config
from ..model.vision import build_vision_model
from ..tiny import tiny_image_processor
from .distributed import whole_models
from .recipe import Recipe, RecipeError, StageSpec

logger = logging.getLogger(__name__)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
RANDOM_BASE, RANDOM_VISION = "base", "vision"


def load_tokenizer(recipe: Recipe) -> Any:
    source = recipe.llm.tokenizer or recipe.llm.name_or_path
    return AutoTokenizer.from_pretrained(source)


def prepare_base(recipe: Recipe, tokenizer: Any) -> str:
    """The base LLM's dir. A random base is built once (seeded) and saved under output_dir, so
    every stage, evaluation and merge sees the very same weights."""
    if recipe.llm.name_or_path is not None:
        return recipe.llm.name_or_path
    path = Path(recipe.output_dir) / RANDOM_BASE
    if _reuse_random(path, {"random": recipe.llm.random, "seed": recipe.seed}, "llm.random"):
        return str(path)
    spec = dict(recipe.llm.random)
    model_type = spec.pop("model_type", "qwen3")
    vocab = spec.setdefault("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        raise RecipeError(f"llm.random.vocab_size: {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens.")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    spec.setdefault("eos_token_id", eos)
    spec.setdefault("pad_token_id", tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    with whole_models():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec))
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with _built_in_place(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_random_manifest(tmp, {"random": recipe.llm.random, "seed": recipe.seed})
    logger.info("built a random %s base (%s parameters) in %s", model_type, f"{model.num_parameters():,}", path)
    return str(path)


def prepare_vision(recipe: Recipe) -> str:
    """The vision tower's dir (a random one is built once and saved, with its image processor)."""
    if recipe.vision.name_or_path is not None:
        return recipe.vision.name_or_path
    path = Path(recipe.output_dir) / RANDOM_VISION
    made_from = {"random": recipe.vision.random, "seed": recipe.seed}
    if not _reuse_random(path, made_from, "vision.random"):
        torch.manual_seed(recipe.seed + 1)
        with whole_models():
            model = build_vision_model(recipe.vision.random)
        with _built_in_place(path) as tmp:
            model.save_pretrained(tmp)
            tiny_image_processor(model.config.image_size).save_pretrained(tmp)
            _write_random_manifest(tmp, made_from)
    return str(path)


RANDOM_MANIFEST = "vlm_peft_random.json"


@contextlib.contextmanager
def _built_in_place(path: Path) -> Iterator[Path]:
    """A dir written under a temporary name and renamed into place whole: a process that dies while
    writing leaves no half a model that a later run would take for the built one."""
    for stale, _ in stale_temporaries(path.parent, rf"\.{re.escape(path.name)}\.partial-(\d+)"):
        remove(stale)  # from a run killed while building
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if path.exists():  # a dir without manifest, from a run that died before this fix
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_random_manifest(path: Path, made_from: dict) -> None:
    (path / RANDOM_MANIFEST).write_text(json.dumps(made_from, sort_keys=True) + "\n")


def _reuse_random(path: Path, made_from: dict, key: str) -> bool:
    """A random model already built for this output_dir is reused only if built from the same config."""
    manifest = path / RANDOM_MANIFEST
    if not manifest.is_file():
        return False
    if json.loads(manifest.read_text()) != json.loads(json.dumps(made_from, sort_keys=True)):
        raise RecipeError(
            f"{key}: {path} was built from a different {key} or seed; use a new output_dir, or delete {path} "
            "(and the stages trained on it)."
        )
    return True


def build_processor(recipe: Recipe, tokenizer: Any, vision_dir: str) -> VLMProcessor:
    image_processor = AutoImageProcessor.from_pretrained(recipe.vision.image_processor or vision_dir)
    return VLMProcessor(image_processor, tokenizer, num_image_tokens=recipe.projector.num_image_tokens)


def load_llm(base: str, dtype: str, attn_implementation: str | None = None) -> torch.nn.Module:
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(base, dtype=DTYPE[dtype], **kwargs)


def new_vlm_config(recipe: Recipe, vision_dir: str, processor: VLMProcessor) -> VLMConfig:
    p = recipe.projector
    return VLMConfig(
        vision_model=vision_dir,
        vision_feature_layer=recipe.vision.feature_layer,
        projector=p.kind,
        num_image_tokens=p.num_image_tokens,
        projector_layers=p.layers,
        projector_heads=p.heads,
        projector_ffn_mult=p.ffn_mult,
        projector_dropout=p.dropout,
        projector_revision=p.revision,
        image_token_id=processor.image_token_id,
    )


def build_stage_model(recipe: Recipe, stage: StageSpec, base: str, init_from: Path | None, new_cfg: VLMConfig):
    """The attached model for a stage: new projector, or the previous stage's; LoRA as the stage says.
    Under ZeRO-3 the LLM loads partitioned (the stage's trainer arguments are built first), the tower whole."""
    llm = load_llm(base, recipe.llm.dtype, recipe.llm.attn_implementation)
    # New projector and LoRA weights come from the recipe's seed, whatever ran before in this process.
    torch.manual_seed(recipe.seed)
    with whole_models():
        model = attach(llm, init_from, is_trainable=True) if init_from else attach(llm, new_cfg)
    saved = get_state(unwrap(model)).config
    if init_from and saved.projector_revision != new_cfg.projector_revision and saved.projector == new_cfg.projector:
        logger.warning(
            "stage %s trains on the projector of %s, made with projector revision %d; the recipe's revision %d "
            "applies to new projectors only (rerun the earlier stages with --overwrite to switch).",
            stage.name, init_from, saved.projector_revision, new_cfg.projector_revision,
        )  # fmt: skip
    if "lora" in stage.train and not isinstance(model, PeftModel):
        spec = stage.lora
        model = add_lora(
            model,
            lora_config(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules),
        )
    if recipe.vision.dtype != "auto":
        get_state(unwrap(model)).vision.to(DTYPE[recipe.vision.dtype])
    for name, param in model.named_parameters():
        role = param_role(name)
        if role == "lora":
            param.requires_grad_("lora" in stage.train)
        elif role == "projector":
            param.requires_grad_("projector" in stage.train)
    return model


def trainable_counts(model: torch.nn.Module) -> dict[str, int]:
    """Each parameter once: PEFT's frozen `original_module` copy of the projector is left out, the
    vision tower (outside the module tree) is counted apart. `total` = LLM + projector + LoRA + tower."""
    counts = {"projector": 0, "lora": 0, "llm": 0, "projector_total": 0, "lora_total": 0}
    for name, param in model.named_parameters():
        role, size = param_role(name), numel(param)
        if role == "projector_copy":
            continue
        if role != "llm":
            counts[f"{role}_total"] += size
        if param.requires_grad:
            counts["lora" if role == "lora" else "projector"] += size
        elif role == "llm":
            counts["llm"] += size
    counts["vision"] = sum(p.numel() for p in get_state(unwrap(model)).vision.parameters())
    counts["total"] = counts["llm"] + counts["projector_total"] + counts["lora_total"] + counts["vision"]
    return counts
