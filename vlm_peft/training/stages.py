"""Running a recipe: build (or reuse) the models, then train each stage with `VLMTrainer`."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from trl import SFTConfig

from ..data.collator import VLMCollator
from ..data.feature_cache import FeatureCache
from ..data.loading import load_rows
from ..data.packing import layout_for
from ..data.rows import fit_to_length
from ..data.streaming import FittingCollator, stream_rows
from ..model.checkpoint import load_training_weights, unwrap
from ..model.config import CONFIG_NAME, VLMConfig
from ..model.hooks import get_state
from ..model.packed import check_packing_attention
from . import distributed
from .build import (
    build_processor,
    build_stage_model,
    load_tokenizer,
    new_vlm_config,
    prepare_base,
    prepare_vision,
    trainable_counts,
)
from .checkpoints import (
    StreamPosition,
    finished_checkpoint,
    history,
    last_complete_checkpoint,
    loss_so_far,
    stream_position,
    trainable_record,
)
from .curves import write_loss_curve
from .distributed import barrier, global_batch, is_main, process
from .evaluate import evaluate, format_summary
from .preflight import check_paths, check_projector_width
from .recipe import Recipe, RecipeError, StageSpec, dump_recipe
from .strategies import check_wrapped_classes
from .trainer import FiniteGuard, VLMTrainer, trainable_sizes

logger = logging.getLogger(__name__)


def sft_config(recipe: Recipe, stage: StageSpec, check_only: bool = False) -> SFTConfig:
    """The stage's trainer arguments. `check_only`: without the distributed settings, whose accelerate
    state is a process singleton (and DeepSpeed's ZeRO-3 config changes how later models load), to
    check every stage's arguments before any model is built."""
    args: dict[str, Any] = {
        "seed": recipe.seed,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "activation_checkpointing": torch.cuda.is_available(),
        # Pinned memory only helps copies to a GPU; without one torch warns for every dataloader.
        "dataloader_pin_memory": torch.cuda.is_available(),
        "report_to": "none",
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        **stage.args,
        "output_dir": str(recipe.stage_dir(stage.name)),
        "learning_rate": stage.lr.projector,
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
    }
    if stage.data.streaming:
        # Resuming skips the consumed rows in the stream itself (StreamPosition), before any is parsed.
        args["ignore_data_skip"] = True
    args = distributed.check_args(args) if check_only else distributed.trainer_args(recipe, args)
    try:
        return SFTConfig(**args)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"stages.{stage.name}.args: {err}") from err


def is_complete(stage_dir: Path) -> bool:
    # metrics.json is written last, after evaluation: a stage that died before it reruns (and, its
    # last checkpoint being at max_steps, only re-saves and re-evaluates).
    return (stage_dir / CONFIG_NAME).is_file() and (stage_dir / "metrics.json").is_file()


def run_stage(
    recipe: Recipe, stage: StageSpec, args: SFTConfig, model, processor, resume: bool | None, callbacks=None
) -> dict:
    stage_dir = recipe.stage_dir(stage.name)
    image_root = stage.data.image_root or str(Path(stage.data.train).parent)
    find = resume is not False and stage_dir.is_dir()
    # The main process moves torn checkpoints aside first; the others then find the same one.
    checkpoint = last_complete_checkpoint(stage_dir) if find and is_main() else None
    barrier()
    if find and not is_main():
        checkpoint = last_complete_checkpoint(stage_dir)
    if resume and checkpoint is None:
        logger.warning("stage %s: --resume given but no checkpoint in %s; starting fresh", stage.name, stage_dir)
    train_rows, eval_rows = _load_data(stage, args, processor)
    layout = None
    if stage.data.packing:
        attention = unwrap(model).config._attn_implementation
        try:
            check_packing_attention(unwrap(model), f"stages.{stage.name}.data.packing")
        except ValueError as err:
            raise RecipeError(str(err)) from None
        layout = stage.data.packing if isinstance(stage.data.packing, str) else layout_for(attention)
        logger.info("stage %s: packing batches in %s layout (%s attention)", stage.name, layout, attention)
    features = None
    if stage.data.features:
        features = FeatureCache(stage.data.features)
        features.check(get_state(unwrap(model)).vision, processor.image_processor)
    counts = trainable_counts(model)
    logger.info(
        "stage %s: %s train rows; trainable: projector %s + LoRA %s; all %s parameters: LLM %s (frozen), "
        "projector %s, LoRA %s, vision tower %s (frozen)",
        stage.name, f"{len(train_rows):,}" if train_rows is not None else "streamed", f"{counts['projector']:,}",
        f"{counts['lora']:,}", f"{counts['total']:,}", f"{counts['llm']:,}", f"{counts['projector_total']:,}",
        f"{counts['lora_total']:,}", f"{counts['vision']:,}",
    )  # fmt: skip
    position = None
    if stage.data.streaming:
        # The user's ignore_data_skip (sft_config sets it for transformers, whose skip would collate every batch).
        skip = not stage.args.get("ignore_data_skip", False)
        position = StreamPosition(stream_position(checkpoint, args) if skip else 0)
        callbacks = [*(callbacks or []), position]
        train_rows = _stream(stage, args, 0)  # what TRL looks at the first row of; training gets the one below
    trainer = _make_trainer(
        model,
        args,
        processor,
        train_rows,
        eval_rows if args.eval_strategy != "no" else None,
        image_root,
        stage,
        callbacks,
        features,
        layout,
    )
    if position is not None:
        if position.rows:
            logger.info("stage %s: the stream resumes after the %s rows trained on", stage.name, f"{position.rows:,}")
        trainer.train_dataset = _stream(stage, args, position.rows)
    if checkpoint:
        _check_same_projector(stage, checkpoint, get_state(unwrap(model)).config)
        _check_same_trainables(stage, checkpoint, trainable_sizes(model))
    if is_main():
        _record_recipe(recipe, stage_dir, resuming=checkpoint is not None)
        logger.info("stage %s: global batch %s", stage.name, global_batch(args))
    if checkpoint:
        logger.info("stage %s: resuming from %s", stage.name, checkpoint)
    before = loss_so_far(checkpoint) if checkpoint else (0.0, 0)
    trainer.loss_before = before
    done = finished_checkpoint(checkpoint, args.max_steps)
    if done is not None:
        # transformers resumed at max_steps trains one step more; the checkpoint is the final state.
        load_training_weights(trainer.model, checkpoint)
        steps = done
        train_loss = before[0] / steps if steps else None
    else:
        try:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        except ValueError as err:
            if checkpoint and "parameter group" in str(err):
                raise RecipeError(
                    f"stages.{stage.name}: {checkpoint} was made with a different `train` list; resume with the "
                    "recipe it was made with, or start over with --resume no."
                ) from err
            raise
        steps = result.global_step
        # The whole stage's mean: transformers' covers only the steps of this run after a resume.
        train_loss = (before[0] + result.training_loss * (steps - before[1])) / max(steps, 1)
    trainer.save_model(str(stage_dir))
    barrier()  # the stage dir is whole before any process goes on
    metrics: dict[str, Any] = {"train_loss": train_loss, "steps": steps, **counts}
    # Every process evaluates its share of the rows on the model as training left it (sharded or not).
    _evaluate_and_record(trainer, stage, processor, eval_rows, checkpoint if done is not None else None, metrics)
    trainer.accelerator.free_memory()  # the engine and optimizer it holds: the next stage builds its own
    barrier()
    return metrics


def _load_data(stage: StageSpec, args: SFTConfig, processor) -> tuple[Any, Any]:
    """The stage's train rows (None when streamed), fitted to max_length, and eval rows: read into the
    cache by the main process first, then memory-mapped by the others from the files it wrote."""
    where = f"stages.{stage.name}.data"

    def load() -> tuple[Any, Any]:
        data, train = stage.data, None
        if not data.streaming:
            train = load_rows(data.train, data.format, num_proc=data.num_proc)
            if args.max_length is not None:
                train = fit_to_length(train, processor, args.max_length, f"{where}.train", num_proc=data.num_proc)
        evaluation = load_rows(data.eval, data.format, num_proc=data.num_proc) if data.eval else None
        return train, evaluation

    loaded = load() if is_main() else None
    barrier()
    return loaded if loaded is not None else load()


def _stream(stage: StageSpec, args: SFTConfig, start: int):
    return stream_rows(
        stage.data.train,
        stage.data.format,
        batch_size=args.per_device_train_batch_size,
        processes=args.world_size,
        workers=args.dataloader_num_workers,
        seed=args.seed,
        shuffle_buffer=stage.data.shuffle_buffer,
        start=start,
    )


def _check_same_projector(stage: StageSpec, checkpoint: str, now: VLMConfig) -> None:
    """A checkpoint made before projector revision 2 holds a revision-1 projector: say so, not a shape error."""
    path = Path(checkpoint) / CONFIG_NAME
    if not path.is_file():
        return
    saved = VLMConfig.from_pretrained(checkpoint)
    if (saved.projector, saved.projector_revision) != (now.projector, now.projector_revision):
        raise RecipeError(
            f"stages.{stage.name}: {checkpoint} was made with projector {saved.projector!r} revision "
            f"{saved.projector_revision}, this run builds {now.projector!r} revision {now.projector_revision}: "
            f"resume with --set projector.kind={saved.projector} --set projector.revision={saved.projector_revision}"
            ", or start over with --resume no."
        )


def _check_same_trainables(stage: StageSpec, checkpoint: str, now: dict[str, int]) -> None:
    saved = trainable_record(checkpoint)
    if saved is not None and saved != now:

        def shown(sizes: dict[str, int]) -> str:
            return f"projector {sizes.get('projector', 0):,} + LoRA {sizes.get('lora', 0):,} parameters"

        raise RecipeError(
            f"stages.{stage.name}: {checkpoint} was made training {shown(saved)}, this run trains {shown(now)}: "
            "another `train` list or LoRA size. Resume with the recipe it was made with, or start over with "
            "--resume no."
        )


def _evaluate_and_record(trainer, stage: StageSpec, processor, eval_rows, finished: str | None, metrics: dict) -> None:
    """Loss curve, held-out evaluation and metrics.json (written last: it marks the stage done)."""
    stage_dir = Path(trainer.args.output_dir)
    logged = trainer.state.log_history if finished is None else history(finished)
    curve = write_loss_curve(logged, stage_dir, f"stage {stage.name}") if is_main() else None
    if curve is not None:
        metrics["loss_curve"] = str(curve)
        logger.info("stage %s: loss curve in %s", stage.name, curve)
    if eval_rows is not None:
        image_root_eval = stage.data.image_root or str(Path(stage.data.eval).parent)
        summary, predictions = evaluate(
            trainer.model_for_evaluation(),
            processor,
            eval_rows,
            image_root_eval,
            batch_size=stage.eval.batch_size,
            max_new_tokens=stage.eval.max_new_tokens,
            max_samples=stage.eval.max_samples,
            process=process(),
        )
        if not is_main():
            return
        metrics.update({f"eval_{k}": v for k, v in summary.items()})
        with (stage_dir / "eval_predictions.jsonl").open("w") as handle:
            handle.writelines(json.dumps(p) + "\n" for p in predictions)
        logger.info("stage %s held-out:\n%s", stage.name, format_summary(summary))
    if is_main():
        (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _record_recipe(recipe: Recipe, stage_dir: Path, resuming: bool) -> None:
    """Write the resolved recipe at the start; on resume, say if it changed since the checkpoint."""
    path = stage_dir / "recipe.yaml"
    stage_dir.mkdir(parents=True, exist_ok=True)
    now = yaml.safe_load(yaml.safe_dump(recipe.to_dict()))
    if resuming and path.is_file() and yaml.safe_load(path.read_text()) != now:
        logger.warning(
            "%s: the recipe changed since this stage's checkpoint; the optimizer, scheduler and step come from the "
            "checkpoint (start over with --resume no to apply the new settings).",
            stage_dir,
        )
    dump_recipe(recipe, path)


def _make_trainer(
    model,
    args: SFTConfig,
    processor,
    train_rows,
    eval_rows,
    image_root: str,
    stage: StageSpec,
    callbacks=None,
    features: FeatureCache | None = None,
    packing: str | None = None,
):

    collator = VLMCollator(processor, image_root, max_length=args.max_length, features=features, packing=packing)
    if stage.data.streaming:  # streamed rows meet max_length here, batch by batch
        collator = FittingCollator(collator, args.max_length, f"stages.{stage.name}.data.train")
    return VLMTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=processor,
        data_collator=collator,
        projector_lr=stage.lr.projector,
        attention_lr=stage.lr.attention_or_default,
        lora_lr=stage.lr.lora,
        callbacks=[FiniteGuard(stage.name), *(callbacks or [])],
    )


def train(
    recipe: Recipe,
    stage: str | None = None,
    resume: bool | None = None,
    overwrite: bool = False,
    callbacks: list | None = None,
) -> dict:
    """Run the recipe's stages in order (or one `stage`); returns metrics per stage.

    A finished stage (adapter dir written) is skipped unless `overwrite`; an interrupted one
    resumes from its last checkpoint unless `resume=False`. `callbacks` go to every trainer.
    """
    if stage is not None:
        recipe.stage(stage)  # fail fast on a wrong name
    # Saved configs name the base and the tower by path: make them work from any directory.
    recipe.output_dir = str(Path(recipe.output_dir).resolve())
    distributed.setup(recipe)
    for s in recipe.stages:  # a bad value fails in seconds, not after the first stage
        sft_config(recipe, s, check_only=True)
    selected = recipe.stages if stage is None else [recipe.stage(stage)]
    # Only the stages that will run: a finished stage's data may be gone.
    check_paths(recipe, [s for s in selected if overwrite or not is_complete(recipe.stage_dir(s.name))])
    check_projector_width(recipe)
    tokenizer = load_tokenizer(recipe)
    if is_main():  # a random base / tower is built once, then read by every process
        prepare_base(recipe, tokenizer)
        prepare_vision(recipe)
    barrier()
    base = prepare_base(recipe, tokenizer)
    vision_dir = prepare_vision(recipe)
    processor = build_processor(recipe, tokenizer, vision_dir)
    new_cfg = new_vlm_config(recipe, vision_dir, processor)
    results: dict[str, Any] = {}
    previous: Path | None = None
    for index, spec in enumerate(recipe.stages):
        stage_dir = recipe.stage_dir(spec.name)
        if stage is not None and spec.name != stage:
            previous = stage_dir if is_complete(stage_dir) else None
            continue
        if is_complete(stage_dir) and not overwrite:
            logger.info("stage %s: already done in %s (--overwrite retrains it)", spec.name, stage_dir)
            results[spec.name] = json.loads((stage_dir / "metrics.json").read_text())
            previous = stage_dir
            continue
        if index and previous is None:
            raise RecipeError(
                f"stage {spec.name} starts from stage {recipe.stages[index - 1].name}, which has not run."
            )
        if overwrite and stage_dir.exists() and is_main():
            shutil.rmtree(stage_dir)
        barrier()
        later = [s.name for s in recipe.stages[index + 1 :] if is_complete(recipe.stage_dir(s.name))]
        if later:
            logger.warning(
                "stage %s is being retrained; %s were trained from its old output: rerun them with --overwrite",
                spec.name,
                later,
            )
        distributed.begin_stage(recipe)
        args = sft_config(recipe, spec)  # first: under ZeRO-3 the LLM then loads partitioned
        model = build_stage_model(recipe, spec, base, previous, new_cfg)
        check_wrapped_classes(recipe.distributed, model)
        results[spec.name] = run_stage(recipe, spec, args, model, processor, resume, callbacks)
        del model  # before the next stage loads its own: no two LLMs in memory at once
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        previous = stage_dir
    return results
