"""YAML recipes: one file describes a whole run, validated completely before any model is built.

Every error names the key path (`stages.sft.args.max_stpes`) and what is allowed there.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.packing import LAYOUTS
from ..model.config import PROJECTOR_KINDS, PROJECTOR_REVISIONS
from ..model.packed import PACKED_ATTENTION
from . import strategies
from .schema import RecipeError, build, check_finite, convert

DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAINABLE = ("projector", "lora")
DATA_FORMATS = ("auto", "jsonl", "json", "parquet", "arrow")
# SFTConfig fields the trainer sets itself, with what to use instead.
RESERVED_ARGS = {
    "output_dir": "set the recipe's top-level output_dir; each stage writes to output_dir/<stage name>",
    "learning_rate": "use lr.projector, lr.lora (and lr.attention) of the stage",
    "remove_unused_columns": "the collator needs every column; vlm-peft sets it",
    "dataset_kwargs": "vlm-peft prepares the dataset itself",
    "dataset_text_field": "rows are conversations in `messages`",
    "packing": "TRL's packing would split image placeholder runs; set stages.<name>.data.packing: true (whole rows)",
    "padding_free": "TRL's padding-free collator has no images; set stages.<name>.data.packing: true",
    "assistant_only_loss": "labels are always masked to the assistant's tokens",
    "completion_only_loss": "labels are always masked to the assistant's tokens",
    "load_best_model_at_end": "not supported yet; evaluate the checkpoints instead",
    "deepspeed": "set the recipe's top-level distributed.strategy (one setting for every stage)",
    "fsdp": "set the recipe's top-level distributed.strategy (one setting for every stage)",
    "fsdp_config": "set the recipe's top-level distributed section (one setting for every stage)",
    "use_cpu": "vlm-peft sets it: on a machine without CUDA, runs of several processes use gloo",
    "ddp_timeout": "set distributed.timeout",
}
# SFTConfig counts that transformers divides by (0 fails mid-run).
POSITIVE_ARGS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
# Stage dirs sit beside these under output_dir.
RESERVED_STAGE_NAMES = ("base", "vision", "data")


@dataclass
class ModelSpec:
    """A model from a local dir / hub id (`name_or_path`), or random weights from an inline config."""

    name_or_path: str | None = None
    random: dict[str, Any] | None = None
    dtype: str = "auto"


@dataclass
class LLMSpec(ModelSpec):
    # Required with `random`; defaults to name_or_path otherwise.
    tokenizer: str | None = None
    # transformers' attn_implementation (sdpa, eager, flash_attention_2, ...); None: its default (sdpa).
    attn_implementation: str | None = None


@dataclass
class VisionSpec(ModelSpec):
    feature_layer: int = -1
    # Defaults to name_or_path; with `random`, a CLIP processor at the config's image size.
    image_processor: str | None = None


@dataclass
class ProjectorSpec:
    kind: str = "cross_attention"
    num_image_tokens: int = 196
    layers: int = 2
    heads: int = 8
    ffn_mult: int = 4
    dropout: float = 0.1
    # cross_attention's design (VLMConfig.projector_revision): 2 = MLP per patch + gated attention + merge.
    revision: int = 2


@dataclass
class DataSpec:
    train: str
    eval: str | None = None
    format: str = "auto"
    image_root: str | None = None
    # A feature cache (vlm-peft data cache-features): training reads patch features, not images.
    features: str | None = None
    # Train rows read from the file as training goes (an endless stream, shuffled per pass), never copied
    # into the cache: for data that does not fit on disk twice. Needs args.max_steps.
    streaming: bool = False
    # Rows shuffled at a time when streaming (0: file order); the rows of a pass are shuffled differently each pass.
    shuffle_buffer: int = 1000
    # Processes that parse and check rows into the cache, and measure them against max_length (default: one
    # per 20k rows, up to 8).
    num_proc: int | None = None
    # Padding-free: each training batch's conversations (each cut to max_length) go end to end, with
    # position_ids restarting per conversation (vlm_peft.data.packing). true: the layout that suits the
    # attention implementation (one flat row for flash / flex attention, rows of the longest
    # conversation's width for SDPA / eager); or name it: "flat", "rows".
    packing: bool | str = False


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # None: the decoder's q/k/v/o/gate/up/down projections (never the projector or the tower).
    target_modules: list[str] | str | None = None


@dataclass
class LRSpec:
    projector: float = 2e-4
    lora: float = 2e-5
    # The cross-attention blocks of a revision-2 projector; None: a tenth of `projector`. They only refine
    # what each patch's MLP holds: at the MLP's rate they cost ~20 points on glyphs (BENCHMARKS §9).
    attention: float | None = None

    @property
    def attention_or_default(self) -> float:
        return self.projector / 10 if self.attention is None else self.attention


@dataclass
class EvalSpec:
    max_new_tokens: int = 32
    batch_size: int = 32
    max_samples: int | None = None


@dataclass
class StageSpec:
    name: str
    data: DataSpec
    train: list[str] = field(default_factory=lambda: ["projector"])
    lora: LoraSpec | None = None
    lr: LRSpec = field(default_factory=LRSpec)
    args: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)


DISTRIBUTED_STRATEGIES = ("none", "ddp", "fsdp", "deepspeed")


@dataclass
class DistributedSpec:
    """How the processes a launcher started (torchrun, accelerate launch, `--nproc N`) share the work;
    one setting for every stage. With one process it changes nothing."""

    strategy: str = "ddp"
    deepspeed: str | dict[str, Any] | None = None
    fsdp: dict[str, Any] | None = None
    # Seconds a process waits at a collective (a barrier, a gradient all-reduce) before failing.
    timeout: int = 1800


@dataclass
class Recipe:
    output_dir: str
    llm: LLMSpec
    vision: VisionSpec
    stages: list[StageSpec]
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    name: str | None = None
    seed: int = 0

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError(f"no stage named {name!r}; the recipe has {[s.name for s in self.stages]}.")

    def stage_dir(self, name: str) -> Path:
        return Path(self.output_dir) / name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(value: Any, allowed: tuple, path: str) -> None:
    if value not in allowed:
        raise RecipeError(f"{path}: {value!r} is not one of {list(allowed)}.")


def _check_model(spec: ModelSpec, path: str) -> None:
    if (spec.name_or_path is None) == (spec.random is None):
        raise RecipeError(f"{path}: set exactly one of name_or_path (dir or hub id) and random (an inline config).")
    _choice(spec.dtype, DTYPES, f"{path}.dtype")


def _check_args(args: dict[str, Any], path: str) -> None:
    """Names against SFTConfig's fields and values against their types (SFTConfig itself takes
    `max_steps: "ten"` and fails only once training starts)."""
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    for key in list(args):
        if key in RESERVED_ARGS:
            raise RecipeError(f"{path}.{key}: not allowed here: {RESERVED_ARGS[key]}.")
        if key not in hints:
            near = difflib.get_close_matches(key, hints, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise RecipeError(f"{path}.{key}: not an SFTConfig argument{hint}.")
        args[key] = convert(args[key], hints[key], f"{path}.{key}")
        if key in POSITIVE_ARGS and isinstance(args[key], int) and args[key] < 1:
            raise RecipeError(f"{path}.{key}: must be >= 1, got {args[key]}.")


def _check_data(stage: StageSpec, path: str) -> None:
    data = stage.data
    if data.num_proc is not None and data.num_proc < 1:
        raise RecipeError(f"{path}.data.num_proc: must be >= 1, got {data.num_proc}.")
    if data.shuffle_buffer < 0:
        raise RecipeError(f"{path}.data.shuffle_buffer: must be >= 0 (0: file order), got {data.shuffle_buffer}.")
    if data.streaming and not (isinstance(stage.args.get("max_steps"), int) and stage.args["max_steps"] > 0):
        raise RecipeError(
            f"{path}.data.streaming: a stream has no length to count epochs in; set {path}.args.max_steps "
            "(the optimizer steps to train)."
        )


def validate(recipe: Recipe) -> Recipe:
    """Cross-field checks that types alone cannot express."""
    _check_model(recipe.llm, "llm")
    _check_model(recipe.vision, "vision")
    if recipe.llm.random is not None and recipe.llm.tokenizer is None:
        raise RecipeError("llm.tokenizer: required with llm.random (a random model has no tokenizer of its own).")
    p = recipe.projector
    _choice(p.kind, PROJECTOR_KINDS, "projector.kind")
    for name in ("num_image_tokens", "layers", "heads", "ffn_mult"):
        if getattr(p, name) < 1:
            raise RecipeError(f"projector.{name}: must be >= 1, got {getattr(p, name)}.")
    if not 0 <= p.dropout < 1:
        raise RecipeError(f"projector.dropout: must be in [0, 1), got {p.dropout}.")
    _choice(p.revision, PROJECTOR_REVISIONS, "projector.revision")
    per_patch = p.kind == "cross_attention" and p.revision == 2
    if recipe.vision.random is not None and (p.kind != "cross_attention" or per_patch):
        cfg = recipe.vision.random
        if "image_size" in cfg and "patch_size" in cfg:
            patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
            if p.kind != "cross_attention" and p.num_image_tokens != patches:
                raise RecipeError(
                    f"projector.num_image_tokens: projector kind {p.kind!r} emits one token per patch, so it must be "
                    f"{patches} for this tower, got {p.num_image_tokens}."
                )
            if per_patch and p.num_image_tokens > patches:
                raise RecipeError(
                    f"projector.num_image_tokens: {p.num_image_tokens} is more than this tower's {patches} patches; "
                    "cross-attention revision 2 makes one token per patch or group of patches (revision 1 takes any)."
                )
    d = recipe.distributed
    _choice(d.strategy, DISTRIBUTED_STRATEGIES, "distributed.strategy")
    if d.timeout < 1:
        raise RecipeError(f"distributed.timeout: must be >= 1 second, got {d.timeout}.")
    if d.deepspeed is not None and d.strategy != "deepspeed":
        raise RecipeError("distributed.deepspeed: given, but distributed.strategy is not 'deepspeed'.")
    if d.fsdp is not None and d.strategy != "fsdp":
        raise RecipeError("distributed.fsdp: given, but distributed.strategy is not 'fsdp'.")
    strategies.check(d)
    if not recipe.stages:
        raise RecipeError("stages: at least one stage is required.")
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        path = f"stages.{stage.name}"
        if names.count(stage.name) > 1:
            raise RecipeError(f"stages[{i}].name: {stage.name!r} is used twice; stage names must be unique.")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", stage.name) or stage.name in RESERVED_STAGE_NAMES:
            raise RecipeError(
                f"stages[{i}].name: {stage.name!r} must be a plain folder name (letters, digits, _ . -) and not "
                f"one of {list(RESERVED_STAGE_NAMES)}."
            )
        if not stage.train:
            raise RecipeError(f"{path}.train: list what the stage trains: {list(TRAINABLE)}.")
        for j, what in enumerate(stage.train):
            _choice(what, TRAINABLE, f"{path}.train[{j}]")
        if stage.lora is not None and "lora" not in stage.train:
            raise RecipeError(f"{path}.lora: LoRA settings given but 'lora' is not in {path}.train.")
        if "lora" in stage.train and stage.lora is None:
            stage.lora = LoraSpec()
        _choice(stage.data.format, DATA_FORMATS, f"{path}.data.format")
        for name in ("projector", "lora", "attention"):
            if getattr(stage.lr, name) is not None and getattr(stage.lr, name) <= 0:
                raise RecipeError(f"{path}.lr.{name}: must be > 0, got {getattr(stage.lr, name)}.")
        if stage.lr.attention is not None and not per_patch:
            what = f"{p.kind!r} (revision {p.revision})" if p.kind == "cross_attention" else repr(p.kind)
            raise RecipeError(
                f"{path}.lr.attention: only the gated attention blocks of cross-attention revision 2 have their own "
                f"rate; this recipe's projector is {what}: remove it."
            )
        _check_args(stage.args, f"{path}.args")
        _check_data(stage, path)
        if stage.args.get("eval_strategy", "no") != "no" and stage.data.eval is None:
            raise RecipeError(f"{path}.args.eval_strategy: needs an eval split in {path}.data.eval.")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(stage.eval, name) < 1:
                raise RecipeError(f"{path}.eval.{name}: must be >= 1, got {getattr(stage.eval, name)}.")
        if stage.lora is not None:
            if stage.lora.r < 1 or stage.lora.alpha <= 0 or not 0 <= stage.lora.dropout < 1:
                raise RecipeError(f"{path}.lora: need r >= 1, alpha > 0 and dropout in [0, 1), got {stage.lora}.")
        if isinstance(stage.data.packing, str) and stage.data.packing not in LAYOUTS:
            raise RecipeError(
                f"{path}.data.packing: {stage.data.packing!r} is not true, false or one of {list(LAYOUTS)}."
            )
        attention = recipe.llm.attn_implementation
        if stage.data.packing and attention is not None and attention not in PACKED_ATTENTION:
            raise RecipeError(
                f"{path}.data.packing: llm.attn_implementation {attention!r} ignores packed sequence boundaries "
                f"(conversations would attend to each other); use one of {list(PACKED_ATTENTION)}, or no packing."
            )
        max_length = stage.args.get("max_length")
        if isinstance(max_length, int) and max_length <= recipe.projector.num_image_tokens + 2:
            raise RecipeError(
                f"{path}.args.max_length: {max_length} cannot hold one image ({recipe.projector.num_image_tokens} "
                "image tokens + 2) and any text."
            )
    return recipe


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key.path=value, e.g. stages.sft.args.max_steps=10.")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_override(data: dict[str, Any], text: str) -> None:
    """`stages.<name>.x=v` addresses a stage by name (or index); values are parsed as YAML."""
    keys, value = _parse_override(text)
    node: Any = data
    walked = []
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        walked.append(key)
        if isinstance(node, list):
            match = [s for s in node if isinstance(s, dict) and s.get("name") == key]
            if match:
                index = node.index(match[0])
            elif key.isdigit() and int(key) < len(node):
                index = int(key)
            else:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise RecipeError(f"--set {text}: no stage {key!r} at {'.'.join(walked[:-1])}; stages are {names}.")
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise RecipeError(f"--set {text}: {'.'.join(walked[:-1])} is a value, not a mapping.")


def load_recipe(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; nothing is built."""
    if isinstance(source, dict):
        data, where = dict(source), "recipe"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found.")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from err
        where = str(path)
    for text in overrides:
        apply_override(data, text)
    try:
        check_finite(data, "")
        return validate(build(Recipe, data, ""))
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from None


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
