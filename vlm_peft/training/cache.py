"""`vlm-peft data cache-features`: a stage's images encoded once by the recipe's tower."""

from __future__ import annotations

from pathlib import Path

from ..data.feature_cache import build_cache
from ..data.loading import load_rows
from ..model.vision import load_vision_tower
from .build import DTYPE, build_processor, load_tokenizer, new_vlm_config, prepare_vision
from .preflight import check_paths
from .recipe import Recipe, RecipeError


def cache_stage_features(
    recipe: Recipe, stage: str, out: str | None = None, batch_size: int = 32, dtype: str = "float16"
) -> dict[str, int]:
    """Encode the images of a stage's train and eval data with the recipe's tower into a feature cache."""
    spec = recipe.stage(stage)
    out = out or spec.data.features
    if out is None:
        raise RecipeError(f"stages.{stage}.data.features: set it (or pass --out) to say where the cache goes.")
    recipe.output_dir = str(Path(recipe.output_dir).resolve())
    check_paths(recipe, [spec], features=False)
    vision_dir = prepare_vision(recipe)
    processor = build_processor(recipe, load_tokenizer(recipe), vision_dir)
    tower = load_vision_tower(new_vlm_config(recipe, vision_dir, processor))
    if recipe.vision.dtype != "auto":
        tower.to(DTYPE[recipe.vision.dtype])
    counts: dict[str, int] = {}
    for split in ("train", "eval"):
        path = getattr(spec.data, split)
        if path is None:
            continue
        rows = load_rows(path, spec.data.format)
        root = spec.data.image_root or str(Path(path).parent)
        got = build_cache(
            rows,
            out,
            tower,
            processor.image_processor,
            image_root=root,
            batch_size=batch_size,
            dtype=dtype,
            source=vision_dir,
        )
        counts = {k: counts.get(k, 0) + v for k, v in got.items() if k != "cached_total"} | {
            "cached_total": got["cached_total"]
        }
    return counts
